"""What this agent made that its leases no longer account for: found, so that it can be ended.

The ledger is written before anything is made and removed after the thing is gone, so a VMM, tap or VM
directory with no lease record is a leftover: of an agent killed between two steps, of a record lost (a
state directory restored from a backup, a hand-deleted file), or of a bug. The agent sweeps at start and
every SWEEP_INTERVAL seconds (host.py), and ends what it finds.

What is "this agent's" is decided narrowly, because other agents (and other tests) may run on the machine:
    a VMM      a live process whose arguments include `path=<this agent's run dir>/<id>/api.sock`
    a tap      an interface named hth* enslaved to this agent's bridge
    a VM dir   a directory directly under this agent's run dir
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SWEEP_INTERVAL = 5.0


def vmm_processes(run_dir: Path) -> dict[str, int]:
    """VM id -> pid of every live (not zombie) VMM serving an API socket under `run_dir`."""
    prefix, found = f"path={run_dir}/".encode(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            if arg.startswith(prefix) and arg.endswith(b"/api.sock"):
                vm_id = arg[len(prefix):-len(b"/api.sock")].decode(errors="replace")
                if "/" not in vm_id and not _zombie(int(pid)):
                    found[vm_id] = int(pid)
                break
    return found


def is_vmm_of(run_dir: Path, vm_id: str):
    """For `processes.hold`: the process is still the VMM of that VM (not a pid reused since)."""
    wanted = f"path={run_dir / vm_id / 'api.sock'}".encode()

    def is_it(pid: int) -> bool:
        try:
            return wanted in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False

    return is_it


def taps_on(bridge: str | None) -> list[str]:
    """hearth's taps (hth*) enslaved to `bridge`."""
    if not bridge:
        return []
    shown = subprocess.run(["ip", "-j", "link", "show", "master", bridge], capture_output=True, text=True, timeout=10)
    if shown.returncode != 0 or not shown.stdout.strip():
        return []
    return [link["ifname"] for link in json.loads(shown.stdout) if link.get("ifname", "").startswith("hth")]


def vm_dirs(run_dir: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(run_dir) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _zombie(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
