"""Host readiness for VFIO: IOMMU, kernel command line, modules, /dev/vfio, interrupts, hugepages.

Each check yields a `Finding`; one that is not ok carries the exact fix (kernel parameter, module,
command). The checks follow what Proxmox, KubeVirt and NVIDIA's DRA driver require of a host
(see shared/notes/vfio.md): IOMMU counts as on only when `/sys/kernel/iommu_groups` is non-empty.
"""

from __future__ import annotations

import os
import stat
from typing import Literal

from pydantic import BaseModel

from vfio.hostroot import HostRoot

Severity = Literal["ok", "info", "warning", "error"]

VFIO_MODULES = ("vfio", "vfio_pci", "vfio_iommu_type1")
MODULES_FIX = (
    "modprobe -a vfio vfio_pci vfio_iommu_type1, and list them in /etc/modules-load.d/vfio.conf "
    "so they load at boot"
)


class Finding(BaseModel, frozen=True):
    subject: str  # "host" or a PCI address
    check: str
    severity: Severity
    message: str
    fix: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.severity in ("warning", "error")


def host_findings(host: HostRoot, group_count: int) -> list[Finding]:
    cmdline = _read(host, "proc/cmdline").split()
    modules = _modules(host)
    return [
        *_iommu(host, group_count, cmdline),
        *modules,
        *(_dev_vfio(host) if host.path("sys/module/vfio").is_dir() else []),  # else the modules finding covers it
        *_unsafe_interrupts(host),
        *_hugepages(host),
        *_nouveau(host),
    ]


def _iommu(host: HostRoot, group_count: int, cmdline: list[str]) -> list[Finding]:
    amd = "AuthenticAMD" in _read(host, "proc/cpuinfo")
    on_param = "amd_iommu=on" if amd else "intel_iommu=on"
    grub = "add it to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub and reboot"
    findings = []
    off = [p for p in cmdline if p in ("intel_iommu=off", "amd_iommu=off", "iommu=off")]
    if group_count == 0:
        findings.append(Finding(
            subject="host", check="iommu", severity="error",
            message="IOMMU is off: /sys/kernel/iommu_groups is empty, so no device can be given to a VM"
            + (f" ({' '.join(off)} is on the kernel command line)" if off else ""),
            fix=f"enable VT-d / AMD-Vi in the firmware, put {on_param} iommu=pt on the kernel command line "
            f"({grub})" + (f", and remove {' '.join(off)}" if off else ""),
        ))
    else:
        findings.append(Finding(subject="host", check="iommu", severity="ok",
                                message=f"IOMMU on ({group_count} groups)"))
    if group_count and not amd and on_param not in cmdline:
        findings.append(Finding(
            subject="host", check="cmdline", severity="info",
            message=f"{on_param} is not on the kernel command line; the IOMMU is on by this kernel's default",
        ))
    if "iommu=pt" not in cmdline:
        findings.append(Finding(
            subject="host", check="cmdline", severity="warning",
            message="iommu=pt is not on the kernel command line: the host's own DMA goes through IOMMU "
            "translation, which costs throughput on NICs and disks",
            fix=f"put iommu=pt on the kernel command line ({grub})",
        ))
    return findings


def _modules(host: HostRoot) -> list[Finding]:
    missing = [m for m in VFIO_MODULES if not host.path("sys/module", m).is_dir()]
    # vfio_iommu_type1's job is done by iommufd's compat container on newer kernels.
    if "vfio_iommu_type1" in missing and host.path("sys/module/iommufd").is_dir():
        missing.remove("vfio_iommu_type1")
    if missing:
        return [Finding(subject="host", check="modules", severity="error",
                        message=f"kernel modules not loaded: {', '.join(missing)}", fix=MODULES_FIX)]
    return [Finding(subject="host", check="modules", severity="ok", message="vfio, vfio_pci, vfio_iommu_type1 loaded")]


def _dev_vfio(host: HostRoot) -> list[Finding]:
    path = host.path("dev/vfio/vfio")
    try:
        info = os.stat(path)
    except OSError:
        return [Finding(subject="host", check="dev-vfio", severity="error",
                        message="/dev/vfio/vfio is missing (the vfio module creates it)", fix=MODULES_FIX)]
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o666:
        return [Finding(subject="host", check="dev-vfio", severity="warning",
                        message=f"/dev/vfio/vfio has mode {mode:04o}, expected 0666 (the container grants nothing by itself)",
                        fix="chmod 0666 /dev/vfio/vfio")]
    return [Finding(subject="host", check="dev-vfio", severity="ok", message="/dev/vfio/vfio present, mode 0666")]


def _unsafe_interrupts(host: HostRoot) -> list[Finding]:
    value = _read(host, "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts").strip()
    if value in ("Y", "1"):
        return [Finding(
            subject="host", check="interrupts", severity="error",
            message="vfio_iommu_type1 allow_unsafe_interrupts is on: a guest can forge MSIs to the host",
            fix="remove allow_unsafe_interrupts=1 from /etc/modprobe.d and the kernel command line, enable "
            "interrupt remapping in the firmware, then reload vfio_iommu_type1 or reboot",
        )]
    return []


def _hugepages(host: HostRoot) -> list[Finding]:
    base = host.path("sys/kernel/mm/hugepages")
    total = free = 0
    sizes = []
    for entry in sorted(os.listdir(base)) if base.is_dir() else []:
        size_kb = int(entry.removeprefix("hugepages-").removesuffix("kB"))
        count = int(_read(host, f"sys/kernel/mm/hugepages/{entry}/nr_hugepages") or 0)
        if count:
            total += count * size_kb
            free += int(_read(host, f"sys/kernel/mm/hugepages/{entry}/free_hugepages") or 0) * size_kb
            sizes.append(f"{count} x {_size(size_kb)}")
    if not total:
        return [Finding(
            subject="host", check="hugepages", severity="warning",
            message="no hugepages reserved: guest RAM will be 4 KiB pages, and VFIO maps all of it at boot, slower",
            fix="reserve them at boot with hugepagesz=1G hugepages=N on the kernel command line "
            "(or sysctl -w vm.nr_hugepages=N for 2 MiB pages)",
        )]
    return [Finding(subject="host", check="hugepages", severity="ok",
                    message=f"hugepages: {', '.join(sizes)} ({_size(free)} of {_size(total)} free)")]


def _nouveau(host: HostRoot) -> list[Finding]:
    if host.path("sys/module/nouveau").is_dir():
        return [Finding(
            subject="host", check="nouveau", severity="warning",
            message="nouveau is loaded: it takes NVIDIA GPUs at boot before they can go to vfio-pci",
            fix="echo 'blacklist nouveau' > /etc/modprobe.d/blacklist-nouveau.conf && update-initramfs -u",
        )]
    return []


def _read(host: HostRoot, relative: str) -> str:
    try:
        return host.path(relative).read_text()
    except OSError:
        return ""


def _size(kb: int) -> str:
    return f"{kb // (1 << 20)} GiB" if kb >= 1 << 20 and kb % (1 << 20) == 0 else f"{kb // 1024} MiB"
