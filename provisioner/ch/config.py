"""A node's VM, as hearth describes it (`VmSpec`), and the `VmConfig` body Cloud Hypervisor takes.

Choices made here, and why:
- Direct kernel boot (kernel + initramfs + cmdline) or firmware, never both: CH rejects both.
- A GPU node's memory, vCPUs and PCI segments follow its `GpuLayout` (ch/gpuvm.py, decided by the host agent
  from the host's facts): 1 GiB hugepages, prefaulted, in memory zones on the GPUs' NUMA nodes, vCPUs pinned
  there, a segment per GPU with apertures that hold its BARs. VFIO maps all guest RAM at `vm.boot`, and 1 GiB
  pages cut the number of IOMMU mappings (CH docs/memory.md; PR #754 halved its VFIO test). A node without
  GPUs keeps plain memory: nothing pins it.
- The guest image and the controller's environment image read-only (many VMs share one of each), plus a
  writable per-node disk.
- Each GPU's IOMMU group (every function) goes on a PCI segment of its own: segment 0 keeps the virtio
  devices, and spreading GPUs spreads the 32-bit MMIO aperture that big-BAR GPUs exhaust (CH docs/vfio.md).
- GPUs of one NVLink clique get `x_nv_gpudirect_clique`, which turns on GPUDirect P2P between them.
- The node id becomes the SMBIOS system UUID and an OEM string, so the guest knows who it is before it
  talks to anyone. Secrets never go here or on the cmdline: they travel over the guest channel.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from provisioner.ch.gpuvm import GpuLayout
from provisioner.errors import validated
from provisioner.node import NODE_ID, GpuRequest
from vfio.address import parse_address

NODE_NAMESPACE = uuid.UUID("6f1c2b8e-6d53-4c1f-9a0e-8e5b7b1d0c11")
MAX_PCI_SEGMENTS = 96


class GpuGroup(GpuRequest):
    """One GPU handed to the VM, with the other functions of its IOMMU group (audio, USB, UCSI): the host
    agent adds them to what the node asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    functions: list[str] = []  # the GPU itself is implied

    @field_validator("functions")
    @classmethod
    def _functions(cls, value: list[str]) -> list[str]:
        return [parse_address(v) for v in value]


class VmSpec(BaseModel):
    """Everything one node's VM needs. Paths are host paths; the per-node ones are created by the launcher."""

    model_config = ConfigDict(extra="forbid")
    node_id: str
    kernel: Path | None = None
    initramfs: Path | None = None
    cmdline: str = "console=ttyS0 reboot=k panic=1 quiet"
    firmware: Path | None = None
    cpus: int = 2
    memory_mib: int = 1024
    hugepages: bool = False
    hugepage_size_mib: int | None = None
    image: Path
    env_disk: Path | None = None  # the controller's environment (an erofs image), read-only like the image
    scratch_disk: Path | None = None
    tap: str | None = None
    mac: str | None = None
    host_ip: str | None = None
    netmask: str = "255.255.255.0"
    vsock_cid: int = 3
    gpus: list[GpuGroup] = []
    layout: GpuLayout | None = None  # memory zones, vCPU pinning, apertures: for GPUs (ch/gpuvm.py)
    sysfs_root: Path = Path("/")  # the host root the GPU sysfs paths are under

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if not NODE_ID.fullmatch(value):
            raise ValueError("use lower-case letters, digits and '-', at most 63 (it names sockets and taps)")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: int) -> int:
        if not 1 <= value <= 254:
            raise ValueError("a VM has 1 to 254 vCPUs")
        return value

    @field_validator("memory_mib")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value < 128:
            raise ValueError("give the VM at least 128 MiB (Ray alone needs about 1 GiB)")
        return value

    @field_validator("tap")
    @classmethod
    def _tap(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
            raise ValueError("a tap name is 1 to 15 characters of letters, digits, '_', '.', '-'")
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", value.lower()):
            raise ValueError("write the MAC as 52:54:00:12:34:56")
        if value is not None and int(value[:2], 16) & 1:
            raise ValueError("the MAC's first octet must be even (unicast)")
        return value.lower() if value else value

    @field_validator("vsock_cid")
    @classmethod
    def _cid(cls, value: int) -> int:
        if not 3 <= value <= 0xFFFFFFFE:
            raise ValueError("guest CIDs start at 3 (0-2 are reserved for the hypervisor and host)")
        return value

    @model_validator(mode="after")
    def _payload(self) -> VmSpec:
        if (self.kernel is None) == (self.firmware is None):
            raise ValueError("give exactly one of kernel (direct boot) or firmware")
        if self.firmware is not None and self.initramfs is not None:
            raise ValueError("initramfs goes with kernel, not firmware")
        if len(self.gpus) + 1 > MAX_PCI_SEGMENTS:
            raise ValueError(f"at most {MAX_PCI_SEGMENTS - 1} GPUs per VM (one PCI segment each)")
        if self.layout is not None:
            if len(self.layout.segments) != len(self.gpus) + 1:
                raise ValueError(f"the layout has {len(self.layout.segments)} PCI segments, the VM needs "
                                 f"{len(self.gpus) + 1} (segment 0 and one per GPU)")
            if sum(z.size_mib for z in self.layout.zones) != self.memory_mib:
                raise ValueError("the layout's memory zones do not add up to memory_mib")
            if any(v >= self.cpus for v in self.layout.affinity):
                raise ValueError("the layout pins a vCPU the VM does not have")
        for name in ("kernel", "initramfs", "firmware", "image", "env_disk"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a file; build the guest image first (hearth guest build)")
        return self

    @property
    def system_uuid(self) -> str:
        return str(uuid.uuid5(NODE_NAMESPACE, self.node_id))


def vm_spec(**fields: Any) -> VmSpec:
    """`VmSpec(**fields)`, with pydantic's errors turned into one `SpecError` naming each field and its fix."""
    return validated(VmSpec, fields, "VM spec")


def vm_config(spec: VmSpec, *, vsock_socket: Path, serial_log: Path) -> dict[str, Any]:
    """The `vm.create` body (schema `VmConfig`)."""
    payload: dict[str, Any] = {"cmdline": spec.cmdline} if spec.kernel else {}
    if spec.kernel:
        payload["kernel"] = str(spec.kernel)
        if spec.initramfs:
            payload["initramfs"] = str(spec.initramfs)
    else:
        payload["firmware"] = str(spec.firmware)
    memory: dict[str, Any] = {"size": spec.memory_mib << 20, "hugepages": spec.hugepages}
    if spec.hugepages and spec.hugepage_size_mib:
        memory["hugepage_size"] = spec.hugepage_size_mib << 20
    cpus: dict[str, Any] = {"boot_vcpus": spec.cpus, "max_vcpus": spec.cpus}
    layout = spec.layout
    if layout is not None:
        memory = {"size": 0, "zones": [_zone(z) for z in layout.zones]}  # size 0: the zones are the memory
        if layout.affinity:
            cpus["affinity"] = [{"vcpu": v, "host_cpus": host} for v, host in sorted(layout.affinity.items())]
    disks = [{"path": str(spec.image), "readonly": True, "id": "image"}]
    if spec.env_disk:
        disks.append({"path": str(spec.env_disk), "readonly": True, "id": "env"})
    if spec.scratch_disk:
        disks.append({"path": str(spec.scratch_disk), "readonly": False, "id": "scratch"})
    config: dict[str, Any] = {
        "payload": payload,
        "cpus": cpus,
        "memory": memory,
        "disks": disks,
        "vsock": {"cid": spec.vsock_cid, "socket": str(vsock_socket), "id": "channel"},
        "serial": {"mode": "File", "file": str(serial_log)},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
        "platform": {"num_pci_segments": 1 + len(spec.gpus), "system_uuid": spec.system_uuid,
                     "oem_strings": [f"hearth-node={spec.node_id}"]},
    }
    if spec.tap:
        net: dict[str, Any] = {"tap": spec.tap, "id": "net0"}
        if spec.mac:
            net["mac"] = spec.mac
        if spec.host_ip:
            net.update(ip=spec.host_ip, mask=spec.netmask)
        config["net"] = [net]
    devices = []
    for index, gpu in enumerate(spec.gpus):
        for function, address in enumerate([gpu.address, *gpu.functions]):
            device: dict[str, Any] = {
                "path": f"{spec.sysfs_root / 'sys/bus/pci/devices' / address}/",
                "id": f"gpu{index}" if function == 0 else f"gpu{index}-fn{function}",
                "pci_segment": 1 + index,
            }
            if gpu.clique is not None and function == 0:
                device["x_nv_gpudirect_clique"] = gpu.clique
            devices.append(device)
    if devices:
        config["devices"] = devices
    if layout is not None:
        config["pci_segments"] = [{"pci_segment": s.pci_segment, "mmio32_aperture_weight": s.mmio32_weight,
                                   "mmio64_aperture_weight": s.mmio64_weight} for s in layout.segments]
        if layout.guest_numa:
            config["numa"] = [{"guest_numa_id": n.guest_numa_id, "cpus": n.cpus, "memory_zones": n.zones,
                               "pci_segments": n.pci_segments} for n in layout.guest_numa]
    return config


def _zone(zone) -> dict[str, Any]:
    body: dict[str, Any] = {"id": zone.id, "size": zone.size_mib << 20}
    if zone.hugepages:
        body.update(hugepages=True, hugepage_size=1 << 30)
    if zone.prefault:
        body["prefault"] = True
    if zone.host_numa_node is not None:
        body["host_numa_node"] = zone.host_numa_node
    return body
