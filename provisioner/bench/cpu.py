"""CPU seconds of processes and their descendants, from /proc: where a benchmark's CPU went.

A host agent's VMMs are its children; once they are reaped their CPU lands in the agent's cutime/cstime.
So "the agent's own CPU" is its utime+stime, and "its VMMs' CPU" is what its live descendants used plus
what its reaped children did (the growth of its cutime+cstime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    own: float  # the process itself
    children: float  # its descendants: live ones as they are, reaped ones as the kernel added them up


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU s, reaped children's CPU s) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def snapshot() -> dict[int, tuple[int, float, float]]:
    """Every process's (ppid, own, reaped children) now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def cpu_of(pids: list[int], table: dict[int, tuple[int, float, float]] | None = None) -> dict[int, Cpu]:
    """Each of `pids`: its own CPU, and its descendants' (live and reaped), from one snapshot of /proc."""
    table = snapshot() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def below(pid: int) -> float:
        return sum(table[c][1] + table[c][2] + below(c) for c in children.get(pid, []))

    return {pid: Cpu(table[pid][1], table[pid][2] + below(pid)) for pid in pids if pid in table}
