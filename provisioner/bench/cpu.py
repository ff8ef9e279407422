"""CPU seconds of processes and their descendants, from /proc: where a benchmark's CPU went.

A host agent's VMMs are its children; once they are reaped their CPU lands in the agent's cutime/cstime.
So "the agent's own CPU" is its utime+stime, and "its VMMs' CPU" is what its live descendants used plus
what its reaped children did (the growth of its cutime+cstime).

A live process's own CPU is read from its CPU clock (nanoseconds), not from /proc/<pid>/stat, whose utime and stime
are whole clock ticks (10 ms), cut down: a forked stand-in VMM booting uses less than a tick, so from stat alone a
cluster's stand-ins read as 0 CPU at ready. Reaped children's CPU is summed by the kernel in nanoseconds and cut
to ticks once, so it stays from stat.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    own: float  # the process itself, to the nanosecond
    children: float  # its descendants: live ones as they are, reaped ones as the kernel added them up


def _cpu_clock(pid: int) -> int:
    """The clock id of a process's CPU time, all its threads (live and ended): what clock_getcpuclockid(3) returns,
    which Python does not wrap (Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return (~pid << 3) | 2


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU s, reaped children's CPU s) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = time.clock_gettime(_cpu_clock(pid))
    except OSError:
        return None
    return int(fields[1]), own, (int(fields[13]) + int(fields[14])) / TICK


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
