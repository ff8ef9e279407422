"""A PCI device's BARs, read from its sysfs `resource` file, and the host's physical address width.

`resource` (drivers/pci/pci-sysfs.c, resource_show) has one line per resource, `0x%016llx 0x%016llx 0x%016llx`:
start, end, flags. Lines 0-5 are the BARs, line 6 the expansion ROM, the rest bridge windows and SR-IOV BARs.
An unused line is all zeros, and so is the upper half of a 64-bit BAR (it takes two BAR slots). The flags are
the kernel's IORESOURCE_* bits (include/linux/ioport.h). A device bound to vfio-pci keeps its BARs assigned, so
this reads the same before and after binding.

Why it matters: a VM must place every BAR of every device it is given in its own guest-physical address space,
an H100's 128 GiB BAR1 included (Cloud Hypervisor's apertures, see provisioner/ch/gpuvm.py); `hearth vfio
status` shows the sizes.
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from vfio.hostroot import HostRoot

IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000
ROM_INDEX = 6


class Bar(BaseModel, frozen=True):
    index: int  # 0-5, or 6 for the expansion ROM
    size: int  # bytes
    kind: str  # "mem" or "io"
    is_64bit: bool = False
    prefetchable: bool = False

    @property
    def is_rom(self) -> bool:
        return self.index == ROM_INDEX

    def describe(self) -> str:
        if self.is_rom:
            return f"ROM {size_text(self.size)}"
        if self.kind == "io":
            return f"BAR{self.index} {size_text(self.size)} I/O"
        kind = ("64-bit" if self.is_64bit else "32-bit") + (" prefetchable" if self.prefetchable else "")
        return f"BAR{self.index} {size_text(self.size)} {kind}"


def read_bars(host: HostRoot, address: str) -> list[Bar]:
    """The BARs and ROM the device has (unused slots left out); [] when its `resource` file is unreadable.
    `address` must already be validated (vfio.address.parse_address)."""
    try:
        text = host.path("sys/bus/pci/devices", address, "resource").read_text()
    except OSError:
        return []
    bars = []
    for index, line in enumerate(text.splitlines()[:ROM_INDEX + 1]):
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (int(f, 16) for f in fields)
        if end == 0 or end < start or not flags & (IORESOURCE_MEM | IORESOURCE_IO):
            continue
        bars.append(Bar(index=index, size=end - start + 1, kind="io" if flags & IORESOURCE_IO else "mem",
                        is_64bit=bool(flags & IORESOURCE_MEM_64), prefetchable=bool(flags & IORESOURCE_PREFETCH)))
    return bars


def address_bits(host: HostRoot) -> int | None:
    """The CPU's physical address width as the host kernel uses it (`address sizes : 46 bits physical` in
    /proc/cpuinfo: already reduced where memory encryption (AMD SME/SEV) takes bits); None when not stated."""
    try:
        text = host.path("proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^address sizes\s*:\s*(\d+) bits physical", text, re.M)
    return int(found.group(1)) if found else None


def size_text(size: int) -> str:
    """128 GiB, 32 MiB, 71.1 MiB, 128 B: in the largest unit it reaches, as lspci writes BAR sizes."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            whole, rest = divmod(size, 1 << shift)
            return f"{whole} {unit}" if not rest else f"{size / (1 << shift):.1f} {unit}"
    return f"{size} B"
