"""Which processes hold a device file open, found the way fuser does: `/proc/<pid>/fd/*` links.

Used to refuse unbinding a GPU from nvidia while anything holds `/dev/nvidia<minor>` (the unbind would
block in the driver until the count drops, possibly forever), and unbinding vfio-pci while a VMM holds
`/dev/vfio/<group>`. The GPU's minor comes from `/proc/driver/nvidia/gpus/<address>/information`.
Everything is read under the host root. Processes in other containers' pid namespaces are visible from
the host's /proc, which is why this looks there rather than asking NVML alone.
"""

from __future__ import annotations

import os
import re

from pydantic import BaseModel

from vfio.hostroot import HostRoot

_MINOR = re.compile(r"^Device Minor:\s*(\d+)", re.MULTILINE)


class Holder(BaseModel, frozen=True):
    pid: int
    command: str
    path: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}) holds {self.path}"


def holders(host: HostRoot, paths: set[str]) -> list[Holder]:
    """Processes with any of `paths` (host paths such as `/dev/nvidia0`) open."""
    proc = host.path("proc")
    found = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids, key=int):
        fd_dir = proc / pid / "fd"
        try:
            targets = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
        except OSError:
            continue  # the process ended, or we may not look
        for path in sorted(targets & paths):
            found.append(Holder(pid=int(pid), command=_command(proc / pid), path=path))
    return found


def nvidia_minor(host: HostRoot, address: str) -> int | None:
    """The `/dev/nvidia<minor>` number the nvidia driver gave the GPU, or None when not on nvidia."""
    try:
        text = host.path("proc/driver/nvidia/gpus", address, "information").read_text()
    except OSError:
        return None
    match = _MINOR.search(text)
    return int(match[1]) if match else None


def _command(pid_dir) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"
