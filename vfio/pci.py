"""The host's PCI devices and IOMMU groups, read from sysfs under the host root.

Sysfs facts used here (Documentation/ABI/testing/sysfs-bus-pci, drivers/pci/pci-sysfs.c):
`vendor`, `device`, `class` are `0x%04x`/`0x%06x`; `driver` and `iommu_group` are symlinks;
`driver_override` reads `(null)` when unset; `numa_node` is -1 when unknown; a bridge has a `pci_bus`
directory; `reset_method` lists the reset methods (absent on older kernels, where `reset` exists).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel

from vfio.errors import HostRootError
from vfio.address import parse_address, slot_of
from vfio.hostroot import HostRoot
from vfio.names import device_name

NVIDIA = 0x10DE
VFIO_DRIVER = "vfio-pci"


class PciDevice(BaseModel, frozen=True):
    address: str
    vendor: int
    device: int
    subsystem_vendor: int | None
    subsystem_device: int | None
    pci_class: int
    name: str
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    numa_node: int | None
    link_speed: str | None
    link_width: int | None
    max_link_speed: str | None
    max_link_width: int | None
    reset_methods: list[str] | None
    d3cold_allowed: bool | None
    is_bridge: bool
    sriov_numvfs: int | None
    vfio_cdev: str | None

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def slot(self) -> str:
        return slot_of(self.address)

    @property
    def is_gpu(self) -> bool:
        """An NVIDIA display controller: VGA (0x0300xx) or 3D (0x0302xx)."""
        return self.vendor == NVIDIA and self.pci_class >> 8 in (0x0300, 0x0302)

    @property
    def is_nvswitch(self) -> bool:
        return self.vendor == NVIDIA and self.pci_class >> 8 == 0x0680

    @property
    def counts_for_viability(self) -> bool:
        """Whether this member keeps a group from being viable: bound to a driver other than vfio-pci."""
        return not (self.is_bridge or self.driver is None or self.driver == VFIO_DRIVER)

    def describe(self) -> str:
        driver = f"driver {self.driver}" if self.driver else "no driver"
        return f"{self.address} ({self.name} [{self.ids}], class 0x{self.pci_class:06x}, {driver})"


class IommuGroup(BaseModel, frozen=True):
    number: int
    members: list[str]
    type: str | None

    def blockers(self, devices: dict[str, PciDevice]) -> list[PciDevice]:
        """Members that keep the group from VFIO use (bound to a host driver)."""
        return [devices[a] for a in self.members if a in devices and devices[a].counts_for_viability]


class PciTopology:
    """A snapshot of the PCI devices and IOMMU groups under one host root."""

    def __init__(self, host: HostRoot) -> None:
        self.host = host
        self.devices: dict[str, PciDevice] = {}
        devices_dir = host.path("sys/bus/pci/devices")
        if devices_dir.is_dir():
            for entry in sorted(os.listdir(devices_dir)):
                try:
                    address = parse_address(entry)
                except ValueError:
                    continue  # not a PCI device directory; never follow it
                self.devices[address] = read_device(host, address)
        self.groups: dict[int, IommuGroup] = {}
        groups_dir = host.path("sys/kernel/iommu_groups")
        if groups_dir.is_dir():
            for entry in os.listdir(groups_dir):
                if entry.isdigit():
                    self.groups[int(entry)] = read_group(host, int(entry))

    @cached_property
    def gpus(self) -> list[PciDevice]:
        return [d for d in self.devices.values() if d.is_gpu]

    @cached_property
    def nvswitches(self) -> list[PciDevice]:
        return [d for d in self.devices.values() if d.is_nvswitch]

    def group_of(self, device: PciDevice) -> IommuGroup | None:
        return self.groups.get(device.iommu_group) if device.iommu_group is not None else None

    def group_viable(self, device: PciDevice) -> bool:
        group = self.group_of(device)
        return group is not None and not group.blockers(self.devices)

    def companions(self, device: PciDevice) -> list[PciDevice]:
        """The other functions of the same card that share its IOMMU group."""
        group = self.group_of(device)
        if group is None:
            return []
        return [
            self.devices[a]
            for a in group.members
            if a != device.address and a in self.devices and self.devices[a].slot == device.slot
        ]


def read_group(host: HostRoot, number: int) -> IommuGroup:
    group_dir = host.path("sys/kernel/iommu_groups", str(number))
    members = []
    if (group_dir / "devices").is_dir():
        for entry in sorted(os.listdir(group_dir / "devices")):
            try:
                members.append(parse_address(entry))
            except ValueError:
                continue
    return IommuGroup(number=number, members=members, type=_read(group_dir / "type"))


def read_device(host: HostRoot, address: str) -> PciDevice:
    """Read one device's sysfs directory; `HostRootError` if it does not exist."""
    base = host.path("sys/bus/pci/devices", address)
    if not base.is_dir():
        raise HostRootError(f"no PCI device {address}: {base} does not exist (is the address right?)")
    vendor, device = _hex(base / "vendor") or 0, _hex(base / "device") or 0
    pci_class = _hex(base / "class") or 0
    override = _read(base / "driver_override")
    reset = _read(base / "reset_method")
    return PciDevice(
        address=address,
        vendor=vendor,
        device=device,
        subsystem_vendor=_hex(base / "subsystem_vendor"),
        subsystem_device=_hex(base / "subsystem_device"),
        pci_class=pci_class,
        name=device_name(host, vendor, device),
        driver=_link_name(base / "driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=_int(_link_name(base / "iommu_group")),
        numa_node=_numa(base / "numa_node"),
        link_speed=_read(base / "current_link_speed"),
        link_width=_int(_read(base / "current_link_width")),
        max_link_speed=_read(base / "max_link_speed"),
        max_link_width=_int(_read(base / "max_link_width")),
        reset_methods=reset.split() if reset is not None else (["supported"] if (base / "reset").exists() else None),
        d3cold_allowed=None if (d3 := _read(base / "d3cold_allowed")) is None else d3 == "1",
        is_bridge=(base / "pci_bus").is_dir() or pci_class >> 8 == 0x0604,
        sriov_numvfs=_int(_read(base / "sriov_numvfs")),
        vfio_cdev=_first_entry(base / "vfio-dev"),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _hex(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _numa(path: Path) -> int | None:
    node = _int(_read(path))
    return None if node is None or node < 0 else node


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target (`driver` -> `.../drivers/nvidia` gives `nvidia`)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _first_entry(path: Path) -> str | None:
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return None
    return entries[0] if entries else None
