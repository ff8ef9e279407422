"""The host's NUMA nodes as a GPU VM needs them: each node's CPUs and its free 1 GiB hugepages.

Read from sysfs under the host root (Documentation/ABI/stable/sysfs-devices-node):
`/sys/devices/system/node/node<N>/cpulist` (`0-55,112-167`) and
`/sys/devices/system/node/node<N>/hugepages/hugepages-1048576kB/{nr,free}_hugepages`. A GPU's node is its
`numa_node` (vfio/pci.py). Guest memory for a GPU should come from the GPU's node, and its vCPUs run there:
DMA and the driver's CPU work then stay on one socket (see provisioner/ch/gpuvm.py).
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from vfio.hostroot import HostRoot

GIB_PAGES = "hugepages-1048576kB"


class NumaNode(BaseModel, frozen=True):
    number: int
    cpus: list[int]
    hugepages_1g: int  # configured (nr_hugepages)
    hugepages_1g_free: int


def numa_nodes(host: HostRoot) -> dict[int, NumaNode]:
    """Every NUMA node the host shows, by number; {} when sysfs has no node directory (a kernel without NUMA)."""
    base = host.path("sys/devices/system/node")
    nodes = {}
    for entry in sorted(os.listdir(base)) if base.is_dir() else []:
        if not (entry.startswith("node") and entry[4:].isdigit()):
            continue
        number = int(entry[4:])
        pages = f"sys/devices/system/node/{entry}/hugepages/{GIB_PAGES}"
        nodes[number] = NumaNode(number=number, cpus=parse_cpulist(_read(host, f"sys/devices/system/node/{entry}/cpulist")),
                                 hugepages_1g=_int(_read(host, f"{pages}/nr_hugepages")),
                                 hugepages_1g_free=_int(_read(host, f"{pages}/free_hugepages")))
    return nodes


def free_hugepages_1g(host: HostRoot) -> int:
    """1 GiB hugepages free on the whole host (for a GPU whose NUMA node is unknown)."""
    return _int(_read(host, f"sys/kernel/mm/hugepages/{GIB_PAGES}/free_hugepages"))


def parse_cpulist(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def cpulist(cpus: list[int]) -> str:
    """The inverse of parse_cpulist, for messages: [0, 1, 2, 3, 8] -> `0-3,8`."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def _read(host: HostRoot, path: str) -> str:
    try:
        return host.path(path).read_text()
    except OSError:
        return ""


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0
