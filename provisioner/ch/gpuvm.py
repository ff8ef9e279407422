"""How a GPU node's VM is laid out under Cloud Hypervisor, decided from the host's facts before any VMM starts.

`plan()` is pure: the host agent reads the facts (`HostFacts`: NUMA nodes, free 1 GiB hugepages, the GPUs' BARs
and NUMA nodes, the physical address width, what the VMM may lock) and gets back a `GpuLayout` for `vm_config`,
or an `AgentError` that names what would break the boot and the fix. Why each choice (see
../shared/notes/gpu-vm.md for the sources):

- **Memory from 1 GiB hugepages, prefaulted.** At `vm.boot` VFIO pins and IOMMU-maps all guest RAM; with 4 KiB
  pages that took 1.2 s per 8 GiB, with prefaulted 1 GiB pages it runs at hundreds of GiB/s, and a missing
  hugepage shows at boot (prefault fails) rather than as a guest SIGBUS later. When the GPUs' NUMA node lacks
  free pages the VM falls back to 4 KiB pages with a warning in the node's events, or is refused when the agent
  runs with `--hugepages require`. Hugepages the agent promised to VMs still booting are counted as taken.
- **NUMA-local.** One memory zone per host NUMA node the VM's GPUs sit on (`host_numa_node`: CH binds it there),
  sized by how many of the GPUs are on it, and each vCPU pinned to its zone's node (`cpus.affinity`: all the
  node's CPUs, so the scheduler still balances inside it). A VM spanning two nodes shows the guest the same two
  nodes (`numa`, with each GPU's PCI segment on its node).
- **A PCI segment per GPU whose apertures hold its BARs.** CH splits the 64-bit MMIO space (from the end of
  guest RAM to the top of the guest's physical address space, 2^min(host bits, 46)) between segments by
  `mmio64_aperture_weight`, each share a multiple of 4 GiB, and the 32-bit space (640 MiB below 4 GiB) by
  `mmio32_aperture_weight`; a BAR is placed naturally aligned, top-down (vmm/src/device_manager.rs,
  vm-allocator). An H100's 128 GiB BAR1 thus needs a 128 GiB-aligned hole in its segment's window. The weights
  give each GPU's segment room for twice its largest BAR (so the alignment always fits) and segment 0 (the
  virtio devices) one share; then CH's placement is replayed, and a VM whose BARs would not fit is refused.
- **Memlock.** VFIO pins all guest RAM in the VMM's name: a VMM without CAP_IPC_LOCK whose RLIMIT_MEMLOCK
  (inherited from the agent) is below guest memory fails at the first DMA map with ENOMEM. Refused up front.
"""

from __future__ import annotations

import math
import os
import resource
from typing import Literal

from pydantic import BaseModel

from provisioner.errors import AgentError
from vfio.bars import Bar, size_text
from vfio.numa import NumaNode, cpulist

GIB = 1 << 30
MIB = 1 << 20
CH_MAX_PHYS_BITS = 46  # CH's default cpus.max_phys_bits: the guest never gets more, whatever the host has
MMIO32_START, MMIO32_SIZE = 3 * GIB, 640 * MIB  # CH's 32-bit device area (x86_64 layout.rs)
MMIO32_ALIGN, MMIO64_ALIGN = 4 << 10, 4 * GIB  # each segment's share of the 32-bit / 64-bit area starts there
PLATFORM_AREA = 1 * MIB  # CH keeps it at the top of the 64-bit space
TOP_GAP = 64 << 10  # ... below the last 64 KiB
LOW_RAM_END = 3 * GIB  # guest RAM above this goes above 4 GiB
CAP_IPC_LOCK = 14
HugepagePolicy = Literal["auto", "require", "off"]


class GpuFacts(BaseModel, frozen=True):
    """One GPU as its host shows it, with every function of its IOMMU group that goes to the VM."""

    address: str
    device: str  # vendor:device, "10de:2330"
    name: str = ""
    numa: int | None = None
    bars: dict[str, list[Bar]] = {}  # by function address, the GPU's own first


class Memlock(BaseModel, frozen=True):
    """What a VMM the agent starts may pin: CAP_IPC_LOCK lifts the limit."""

    can_lock: bool
    limit: int | None  # RLIMIT_MEMLOCK in bytes; None: unlimited

    def allows(self, size: int) -> bool:
        return self.can_lock or self.limit is None or self.limit >= size

    def describe(self) -> str:
        if self.can_lock:
            return "the VMM has CAP_IPC_LOCK"
        return "RLIMIT_MEMLOCK unlimited" if self.limit is None else f"RLIMIT_MEMLOCK {size_text(self.limit)}"


class HostFacts(BaseModel, frozen=True):
    gpus: dict[str, GpuFacts]
    nodes: dict[int, NumaNode] = {}
    free_hugepages: int = 0  # 1 GiB pages free on the whole host (for GPUs with no known NUMA node)
    address_bits: int | None = None
    memlock: Memlock = Memlock(can_lock=True, limit=None)


class MemoryZone(BaseModel, frozen=True):
    id: str
    size_mib: int
    host_numa_node: int | None = None
    hugepages: bool = False
    prefault: bool = False


class GuestNumaNode(BaseModel, frozen=True):
    guest_numa_id: int
    cpus: list[int]
    zones: list[str]
    pci_segments: list[int]


class Segment(BaseModel, frozen=True):
    pci_segment: int
    mmio32_weight: int
    mmio64_weight: int
    window64: int = 0  # bytes CH gives it, as replayed here
    window32: int = 0


class GpuLayout(BaseModel, frozen=True):
    zones: list[MemoryZone]
    affinity: dict[int, list[int]] = {}  # vCPU -> host CPUs
    guest_numa: list[GuestNumaNode] = []
    segments: list[Segment]
    address_bits: int  # the guest's physical address width the apertures were sized for
    hugepages: list[tuple[int | None, int]] = []  # 1 GiB pages taken, per host NUMA node (None: none known)
    notes: list[str] = []
    warnings: list[str] = []

    def describe(self) -> str:
        """One paragraph for the node's events: what the VM got, then each warning."""
        return "; ".join([*self.notes, *(f"warning: {w}" for w in self.warnings)])


def plan(*, node: str, memory_mib: int, cpus: int, gpus: list[str], facts: HostFacts,
         hugepages: HugepagePolicy = "auto", promised: dict[int | None, int] | None = None) -> GpuLayout:
    """The layout of node `node`'s VM with these GPUs (addresses, in the order they get segments 1, 2, ...).
    `promised`: 1 GiB pages per NUMA node already promised to VMs that have not finished booting."""
    promised = promised or {}
    warnings: list[str] = []
    memory = memory_mib * MIB
    if not facts.memlock.allows(memory):
        raise AgentError(
            f"node {node}: its VMM could pin only {size_text(facts.memlock.limit)} of its {size_text(memory)} of guest "
            "memory (RLIMIT_MEMLOCK, which cloud-hypervisor inherits from the agent, without CAP_IPC_LOCK); VFIO pins "
            "all guest memory at vm.boot and would fail with ENOMEM. Fix: LimitMEMLOCK=infinity for the agent "
            "(systemctl edit hearth-agent) or run the agent as root")
    domains, home = _domains(gpus, facts, warnings)
    weights = [sum(1 for g in gpus if home[g] == d) for d in domains]
    zones, taken = _memory(node, memory_mib, domains, weights, facts, hugepages, promised, warnings)
    affinity, per_node_cpus = _vcpus(cpus, domains, weights, facts, warnings)
    bits = min(facts.address_bits or CH_MAX_PHYS_BITS, CH_MAX_PHYS_BITS)
    if facts.address_bits is None:
        warnings.append(f"the host's physical address width is unknown (/proc/cpuinfo): apertures sized for "
                        f"{CH_MAX_PHYS_BITS} bits, CH's own limit")
    segments = _apertures(node, memory, gpus, facts, bits)
    guest_numa = []
    if len(zones) > 1 and len(zones) == len(domains) and all(per_node_cpus):  # CH wants each guest node's vCPUs
        for index, (domain, zone) in enumerate(zip(domains, zones)):
            guest_numa.append(GuestNumaNode(
                guest_numa_id=index, cpus=per_node_cpus[index], zones=[zone.id],
                pci_segments=([0] if index == 0 else []) + [1 + i for i, g in enumerate(gpus) if home[g] == domain]))
    notes = [_memory_note(zones), _cpu_note(affinity, cpus, domains, facts), _segments_note(gpus, segments, facts, bits)]
    return GpuLayout(zones=zones, affinity=affinity, guest_numa=guest_numa, segments=segments, address_bits=bits,
                     hugepages=taken, notes=notes, warnings=warnings)


def memlock() -> Memlock:
    """What a VMM started by this process may lock: CAP_IPC_LOCK survives exec for root (its bounding set) and
    for anyone as an ambient capability; RLIMIT_MEMLOCK is inherited as it is."""
    caps = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("CapBnd:", "CapAmb:")):
                    name, value = line.split(":")
                    caps[name] = int(value, 16)
    except OSError:
        pass
    bit = 1 << CAP_IPC_LOCK
    can_lock = bool((os.geteuid() == 0 and caps.get("CapBnd", 0) & bit) or caps.get("CapAmb", 0) & bit)
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return Memlock(can_lock=can_lock, limit=None if soft == resource.RLIM_INFINITY else soft)


# -- NUMA, memory, vCPUs ------------------------------------------------------------------------------------------
def _node_of(address: str, facts: HostFacts) -> int | None:
    numa = facts.gpus[address].numa
    return numa if numa is not None and numa in facts.nodes else None


def _domains(gpus: list[str], facts: HostFacts,
             warnings: list[str]) -> tuple[list[int | None], dict[str, int | None]]:
    """The host NUMA nodes the VM's memory and vCPUs go to: those of its GPUs, by how many GPUs each holds
    (most first), or [None] when no GPU's node is known; and each GPU's (a GPU whose node is unknown counts
    with the first)."""
    counts: dict[int, int] = {}
    unknown = []
    for address in gpus:
        numa = _node_of(address, facts)
        if numa is None:
            unknown.append(address)
        else:
            counts[numa] = counts.get(numa, 0) + 1
    if unknown:
        warnings.append(f"NUMA node of {', '.join(unknown)} unknown (numa_node -1, or no such node in "
                        "/sys/devices/system/node): "
                        + ("it counts with the other GPUs' node" if counts else "memory and vCPUs are not pinned"))
    domains: list[int | None] = sorted(counts, key=lambda n: (-counts[n], n)) or [None]
    return domains, {g: _node_of(g, facts) if _node_of(g, facts) is not None else domains[0] for g in gpus}


def _shares(total: int, weights: list[int]) -> list[int]:
    """`total` split by `weights`, in whole units, the remainder to the first."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    shares[0] += total - sum(shares)
    return shares


def _memory(node: str, memory_mib: int, domains: list[int | None], counts: list[int], facts: HostFacts,
            policy: HugepagePolicy, promised: dict[int | None, int],
            warnings: list[str]) -> tuple[list[MemoryZone], list[tuple[int | None, int]]]:
    if memory_mib % 1024 == 0 and memory_mib // 1024 >= len(domains):
        sizes = [gib * 1024 for gib in _shares(memory_mib // 1024, counts)]
    else:
        sizes = _shares(memory_mib, counts) if memory_mib >= 128 * len(domains) else [memory_mib] + [0] * (len(domains) - 1)
    pairs = [(d, s) for d, s in zip(domains, sizes) if s]
    short = []
    if policy == "off":
        reason = "the agent runs with --hugepages off"
    elif memory_mib % 1024:
        reason = f"its memory ({memory_mib} MiB) is not a whole number of GiB"
    else:
        for domain, size in pairs:
            free = (facts.nodes[domain].hugepages_1g_free if domain is not None else facts.free_hugepages)
            free -= promised.get(domain, 0)
            if free < size // 1024:
                where = f"NUMA node {domain}" if domain is not None else "the host"
                held = f" ({promised[domain]} promised to VMs still booting)" if promised.get(domain) else ""
                short.append(f"{where} has {max(free, 0)} free 1 GiB hugepages{held}, the VM needs {size // 1024} there")
        reason = "; ".join(short)
    use = not reason
    if not use:
        fix = ("reserve more (kernel command line hugepagesz=1G hugepages=N, or at run time "
               "/sys/devices/system/node/node<N>/hugepages/hugepages-1048576kB/nr_hugepages), lower the node's memory")
        if policy == "require":
            raise AgentError(f"node {node}: guest memory must come from 1 GiB hugepages (the agent runs with "
                             f"--hugepages require), but {reason}. Fix: {fix}, or run the agent with --hugepages auto")
        if policy != "off":
            warnings.append(f"guest memory from 4 KiB pages, not 1 GiB hugepages: {reason}; VFIO pins every page at "
                            f"vm.boot (about 1.2 s per 8 GiB). Fix: {fix}")
    zones = [MemoryZone(id=f"mem{i}", size_mib=size, host_numa_node=domain, hugepages=use, prefault=use)
             for i, (domain, size) in enumerate(pairs)]
    taken = [(domain, size // 1024) for domain, size in pairs] if use else []
    return zones, taken


def _vcpus(cpus: int, domains: list[int | None], counts: list[int], facts: HostFacts,
           warnings: list[str]) -> tuple[dict[int, list[int]], list[list[int]]]:
    per_node = _shares(cpus, counts) if cpus >= len(domains) else [cpus] + [0] * (len(domains) - 1)
    affinity, vcpus, next_vcpu = {}, [], 0
    for domain, count in zip(domains, per_node):
        mine = list(range(next_vcpu, next_vcpu + count))
        next_vcpu += count
        vcpus.append(mine)
        host_cpus = facts.nodes[domain].cpus if domain is not None else []
        if domain is not None and not host_cpus:
            warnings.append(f"NUMA node {domain} lists no CPUs: its vCPUs are not pinned")
        elif domain is not None and count > len(host_cpus):
            warnings.append(f"{count} vCPUs on NUMA node {domain}, which has {len(host_cpus)} CPUs")
        for vcpu in mine if host_cpus else []:
            affinity[vcpu] = host_cpus
    return affinity, vcpus


def _memory_note(zones: list[MemoryZone]) -> str:
    parts = [f"{_mib(z.size_mib)}" + (f" on NUMA node {z.host_numa_node}" if z.host_numa_node is not None else "")
             for z in zones]
    pages = "from 1 GiB hugepages, prefaulted" if zones[0].hugepages else "from 4 KiB pages"
    return f"memory {' + '.join(parts)} {pages}"


def _cpu_note(affinity: dict[int, list[int]], cpus: int, domains: list[int | None], facts: HostFacts) -> str:
    if not affinity:
        return f"{cpus} vCPUs, not pinned"
    nodes = [d for d in domains if d is not None]
    return f"{cpus} vCPUs pinned to " + " and ".join(
        f"node {d}'s CPUs {cpulist(facts.nodes[d].cpus)}" for d in nodes)


def _mib(size_mib: int) -> str:
    return f"{size_mib // 1024} GiB" if size_mib % 1024 == 0 else f"{size_mib} MiB"


# -- apertures ----------------------------------------------------------------------------------------------------
def _bars(address: str, facts: HostFacts) -> tuple[list[Bar], list[Bar]]:
    """The 64-bit and the 32-bit memory BARs (the ROM counts as 32-bit, as CH maps it) of a GPU's functions, in
    the order CH places them: function by function, BAR by BAR."""
    wide, narrow = [], []
    for bars in facts.gpus[address].bars.values():
        for bar in bars:
            if bar.kind == "mem":
                (wide if bar.is_64bit and not bar.is_rom else narrow).append(bar)
    return wide, narrow


def _windows(start: int, end: int, weights: list[int], align: int) -> list[tuple[int, int]]:
    """CH's split of [start, end] between segments (device_manager.rs, create_mmio_allocators): one share per
    unit of weight, each a multiple of `align`, in segment order."""
    unit = (end - start + 1) // (align * sum(weights)) * align
    windows, offset = [], 0
    for weight in weights:
        windows.append((start + offset * unit, unit * weight))
        offset += weight
    return windows


def _fits(window: tuple[int, int], bars: list[Bar], alignment_floor: int) -> bool:
    """Whether CH's allocator, which takes each BAR naturally aligned from the top of the window down, places
    them all. Sizes are powers of two, so each one goes just below the lowest placed so far, aligned."""
    base, size = window
    if size == 0:
        return not bars
    cursor = base + size
    for bar in bars:
        align = max(bar.size, alignment_floor)
        cursor = (cursor - bar.size) // align * align
        if cursor < base:
            return False
    return True


def _apertures(node: str, memory: int, gpus: list[str], facts: HostFacts, bits: int) -> list[Segment]:
    start64 = 4 * GIB + max(memory - LOW_RAM_END, 0)
    end64 = (1 << bits) - TOP_GAP - PLATFORM_AREA - 1
    wide = [_bars(a, facts)[0] for a in gpus]
    narrow = [_bars(a, facts)[1] for a in gpus]

    def need(bars: list[Bar], unit: int) -> int:  # units of `unit` for twice the largest BAR plus the rest
        if not bars:
            return 1
        largest = max(b.size for b in bars)
        return max(1, math.ceil((2 * largest + sum(b.size for b in bars) - largest) / unit))

    candidates = [
        ([1] + [need(b, MMIO64_ALIGN) for b in wide], [1] + [need(b, 16 * MIB) for b in narrow]),
        ([1] * (len(gpus) + 1), [1] * (len(gpus) + 1)),  # CH's default: equal shares
    ]
    for weights64, weights32 in candidates:
        windows64 = _windows(start64, end64, weights64, MMIO64_ALIGN) if end64 > start64 else [(0, 0)] * len(weights64)
        windows32 = _windows(MMIO32_START, MMIO32_START + MMIO32_SIZE - 1, weights32, MMIO32_ALIGN)
        if all(_fits(w, b, 4 << 10) for w, b in zip(windows64[1:], wide)) and \
                all(_fits(w, b, 1) for w, b in zip(windows32[1:], narrow)) and windows64[0][1] > 0:
            return [Segment(pci_segment=i, mmio32_weight=w32, mmio64_weight=w64, window64=win64[1], window32=win32[1])
                    for i, (w32, w64, win64, win32) in enumerate(zip(weights32, weights64, windows64, windows32))]
    total64 = sum(b.size for bars in wide for b in bars)
    largest = max((b for bars in wide for b in bars), key=lambda b: b.size, default=None)
    space = max(end64 - start64 + 1, 0)
    raise AgentError(
        f"node {node}: its GPUs' BARs do not fit the guest's physical address space: {len(gpus)} GPU(s) with "
        f"{size_text(total64)} of 64-bit BARs"
        + (f" (the largest {size_text(largest.size)}, which needs a {size_text(largest.size)}-aligned hole)" if largest else "")
        + f", and {size_text(space)} of 64-bit MMIO space above the guest's {size_text(memory)} of RAM in a {bits}-bit "
        f"guest physical address space (the host's CPU has {facts.address_bits or 'an unknown number of'} bits, CH "
        f"gives a guest at most {CH_MAX_PHYS_BITS}). Fix: fewer GPUs per node, less memory, or a host whose CPU "
        "has more physical address bits")


def _segments_note(gpus: list[str], segments: list[Segment], facts: HostFacts, bits: int) -> str:
    """Each GPU's segment: its windows and what they hold; GPUs alike are said once."""
    parts: dict[str, list[str]] = {}
    for address, segment in zip(gpus, segments[1:]):
        wide, narrow = _bars(address, facts)
        gpu = facts.gpus[address]
        what = (f"{gpu.name or gpu.device}: 64-bit window {size_text(segment.window64)} for "
                f"{' + '.join(size_text(b.size) for b in wide) or 'no BAR'}, 32-bit {size_text(segment.window32)} for "
                f"{' + '.join(size_text(b.size) for b in narrow) or 'no BAR'}")
        parts.setdefault(what, []).append(f"{segment.pci_segment} ({address}, NUMA {gpu.numa if gpu.numa is not None else '?'})")
    return (f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} on PCI segment{'s' if len(gpus) != 1 else ''} "
            + "; ".join(f"{', '.join(where)}, each {what}" if len(where) > 1 else f"{where[0]}, {what}"
                        for what, where in parts.items())
            + f"; guest physical addresses {bits}-bit")
