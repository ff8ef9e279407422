"""The admin's picture of a GPU host: readiness findings, its NUMA nodes (CPUs, free 1 GiB hugepages) and physical
address width, then each GPU with its group, BARs, NUMA node and problems.

`host_report()` reads everything once (sysfs, /proc, NVML where it applies) and decides which GPUs are
meant for VFIO: those in hearth's boot record, those whose driver_override says vfio-pci, and, when the
host has no record yet, every NVIDIA GPU (a hearth host gives its GPUs to VMs). A GPU meant for VFIO that
is not ready is a problem; a GPU kept for the host is only shown.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from types import ModuleType

from pydantic import BaseModel

from vfio.bars import Bar, address_bits, read_bars
from vfio.fabric import FabricManager, fabric_manager
from vfio.holders import Holder, holders, nvidia_minor
from vfio.hostroot import HostRoot
from vfio.numa import NumaNode, numa_nodes
from vfio.nvml import NvmlGpu, NvmlReport, nvml_inventory
from vfio.pci import VFIO_DRIVER, PciDevice, PciTopology
from vfio.persist import RECORD, boot_binding, read_record
from vfio.readiness import Finding, host_findings


class DevVfio(BaseModel, frozen=True):
    path: str
    present: bool
    owner: str | None = None
    mode: str | None = None


class GpuReport(BaseModel, frozen=True):
    device: PciDevice
    kind: str  # "gpu" or "nvswitch"
    group_members: list[PciDevice]
    bars: list[Bar] = []  # its own (a VM must map each; the 64-bit ones set its apertures)
    group_viable: bool
    dev_vfio: DevVfio | None
    meant_for_vfio: bool
    boot_binding: str | None
    nvml: NvmlGpu | None
    holders: list[Holder]
    findings: list[Finding]


class HostReport(BaseModel, frozen=True):
    host_root: str
    host: list[Finding]
    nvml: NvmlReport
    gpus: list[GpuReport]
    numa: list[NumaNode] = []
    address_bits: int | None = None  # the CPU's physical address width (a VM's BARs must fit below it)
    fabric_manager: FabricManager | None = None  # on a host with NVSwitches

    @property
    def problems(self) -> list[Finding]:
        return [f for f in [*self.host, *(f for g in self.gpus for f in g.findings)] if f.is_problem]

    @property
    def exit_code(self) -> int:
        """Monitoring plugin convention: 0 ready, 1 warnings only, 2 errors."""
        severities = {f.severity for f in self.problems}
        return 2 if "error" in severities else 1 if "warning" in severities else 0


def host_report(host: HostRoot, nvml: ModuleType | None = None, topology: PciTopology | None = None) -> HostReport:
    topology = topology or PciTopology(host)
    findings = host_findings(host, len(topology.groups))
    record = read_record(host)
    on_nvidia = any(d.driver == "nvidia" for d in topology.gpus)
    nvml_report = nvml_inventory(host, nvml) if on_nvidia else NvmlReport(
        available=False, reason="not queried: no GPU is on the nvidia driver")
    gpus = [
        _gpu_report(host, topology, device, record, nvml_report)
        for device in [*topology.gpus, *topology.nvswitches]
    ]
    if not topology.gpus:
        findings.append(Finding(subject="host", check="gpus", severity="warning",
                                message="no NVIDIA GPUs found on this host: it cannot serve GPU nodes"))
    if record is None and topology.gpus:
        findings.append(Finding(
            subject="host", check="record", severity="info",
            message=f"no {RECORD}: every GPU is taken as meant for VFIO"))
    return HostReport(host_root=str(host.root), host=findings, nvml=nvml_report, gpus=gpus,
                      numa=list(numa_nodes(host).values()), address_bits=address_bits(host),
                      fabric_manager=fabric_manager(host) if topology.nvswitches else None)


def _gpu_report(host: HostRoot, topology: PciTopology, device: PciDevice,
                record: dict[str, str] | None, nvml: NvmlReport) -> GpuReport:
    group = topology.group_of(device)
    members = [topology.devices[a] for a in group.members if a in topology.devices] if group else []
    dev_vfio = _dev_vfio(host, device.iommu_group) if device.iommu_group is not None else None
    minor = nvidia_minor(host, device.address) if device.driver == "nvidia" else None
    held = holders(host, {f"/dev/nvidia{minor}"}) if minor is not None else []
    if device.is_gpu:
        meant = record is None or device.address in record or device.driver_override == VFIO_DRIVER
    else:  # NVSwitches go to VMs only in full passthrough, which the admin asks for by name
        meant = bool(record and device.address in record) or device.driver_override == VFIO_DRIVER
    viable = topology.group_viable(device)
    binding = boot_binding(host, device, record)
    findings = _gpu_findings(device, group.number if group else None, members, viable, dev_vfio, meant, binding)
    return GpuReport(
        device=device, kind="gpu" if device.is_gpu else "nvswitch", group_members=members,
        bars=read_bars(host, device.address), group_viable=viable, dev_vfio=dev_vfio, meant_for_vfio=meant, boot_binding=binding,
        nvml=nvml.gpus.get(device.address), holders=held, findings=findings,
    )


def _gpu_findings(device: PciDevice, group: int | None, members: list[PciDevice], viable: bool,
                  dev_vfio: DevVfio | None, meant: bool, binding: str | None) -> list[Finding]:
    address = device.address
    if not meant:
        return [Finding(subject=address, check="use", severity="info",
                        message=f"kept for the host (driver {device.driver or 'none'}); not in {RECORD}")]
    if group is None:
        return [Finding(subject=address, check="group", severity="error",
                        message="no IOMMU group (the IOMMU is off)", fix="turn the IOMMU on (see the host findings)")]
    findings = []
    if device.driver != VFIO_DRIVER:
        findings.append(Finding(
            subject=address, check="driver", severity="error",
            message=f"on {device.driver or 'no driver'}, not vfio-pci: VMs cannot have it",
            fix=f"hearth vfio bind {address} --persist"))
    foreign = [m for m in members if m.slot != device.slot and m.counts_for_viability]
    blockers = [m for m in members if m.slot == device.slot and m.counts_for_viability and m.address != address]
    if foreign:
        findings.append(Finding(
            subject=address, check="group", severity="error",
            message=f"IOMMU group {group} also holds {'; '.join(m.describe() for m in foreign)}: "
            "the group cannot go to a VM without it",
            fix="move the GPU to a slot with its own IOMMU group (a PCIe switch with ACS), or give the "
            "other device to VMs as well by naming it to hearth vfio bind"))
    if blockers:
        findings.append(Finding(
            subject=address, check="group", severity="error",
            message=f"IOMMU group {group} is not viable: "
            + ", ".join(f"{m.address} is on {m.driver}" for m in blockers),
            fix=f"hearth vfio bind {address} (binds the card's other functions too)"))
    if device.driver == VFIO_DRIVER and dev_vfio is not None and not dev_vfio.present:
        findings.append(Finding(
            subject=address, check="dev-vfio", severity="error",
            message=f"{dev_vfio.path} is missing though the GPU is on vfio-pci",
            fix="check that the vfio module is loaded and dmesg for vfio errors"))
    if device.driver == VFIO_DRIVER and binding is None:
        findings.append(Finding(
            subject=address, check="persist", severity="warning",
            message="bound to vfio-pci now, but nothing binds it again at boot",
            fix=f"hearth vfio bind {address} --persist"))
    if device.driver == VFIO_DRIVER and viable and not findings:
        findings.append(Finding(subject=address, check="ready", severity="ok",
                                message=f"ready for VMs (group {group}, bound at boot by {binding})"))
    return findings


def _dev_vfio(host: HostRoot, group: int) -> DevVfio:
    path = host.path("dev/vfio", str(group))
    try:
        info = os.stat(path)
    except OSError:
        return DevVfio(path=f"/dev/vfio/{group}", present=False)
    return DevVfio(path=f"/dev/vfio/{group}", present=True, owner=_owner(host, info),
                   mode=f"{stat.S_IMODE(info.st_mode):04o}")


def _owner(host: HostRoot, info: os.stat_result) -> str:
    """`user:group` by name on the live host; numeric under another root, whose names we cannot know."""
    if not host.is_live:
        return f"{info.st_uid}:{info.st_gid}"
    try:
        return f"{pwd.getpwuid(info.st_uid).pw_name}:{grp.getgrgid(info.st_gid).gr_name}"
    except KeyError:
        return f"{info.st_uid}:{info.st_gid}"
