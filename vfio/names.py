"""Human names for PCI ids, from the host's pci.ids database when it has one.

pci.ids (pciutils / hwdata) is read under the host root and only the vendor sections asked for are
parsed. Hosts without it (minimal images) still get names for the NVIDIA parts hearth deals with most.
"""

from __future__ import annotations

from functools import lru_cache

from vfio.hostroot import HostRoot

PCI_IDS_PATHS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")

# Fallback for hosts without pci.ids: the data-centre parts a hearth host is likely to hold.
KNOWN = {
    (0x10DE, 0x20B0): "GA100 [A100 SXM4 40GB]",
    (0x10DE, 0x20B2): "GA100 [A100 SXM4 80GB]",
    (0x10DE, 0x20B5): "GA100 [A100 PCIe 80GB]",
    (0x10DE, 0x2330): "GH100 [H100 SXM5 80GB]",
    (0x10DE, 0x2331): "GH100 [H100 PCIe]",
    (0x10DE, 0x2335): "GH100 [H200 SXM 141GB]",
    (0x10DE, 0x26B9): "AD102GL [L40S]",
    (0x10DE, 0x2901): "GB100 [B200]",
    (0x10DE, 0x22A3): "GH100 [H100 NVSwitch]",
    (0x10DE, 0x1AF1): "GA100 [A100 NVSwitch]",
}
VENDORS = {0x10DE: "NVIDIA", 0x8086: "Intel", 0x1022: "AMD", 0x15B3: "Mellanox", 0x1AF4: "Red Hat (virtio)"}


def device_name(host: HostRoot, vendor: int, device: int) -> str:
    names = _pci_ids(str(host.root))
    vendor_name, devices = names.get(vendor, (VENDORS.get(vendor, f"vendor {vendor:04x}"), {}))
    return devices.get(device) or KNOWN.get((vendor, device)) or f"{vendor_name} device {device:04x}"


@lru_cache(maxsize=8)
def _pci_ids(root: str) -> dict[int, tuple[str, dict[int, str]]]:
    host = HostRoot(root)
    for candidate in PCI_IDS_PATHS:
        path = host.path(candidate)
        if path.is_file():
            return _parse(path.read_text(errors="replace"))
    return {}


def _parse(text: str) -> dict[int, tuple[str, dict[int, str]]]:
    """Vendor and device lines of pci.ids: `vvvv  Vendor`, then `\\tdddd  Device` (subsystems skipped)."""
    result: dict[int, tuple[str, dict[int, str]]] = {}
    current: dict[int, str] | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):  # the class list at the end of the file
            break
        if not line.startswith("\t"):
            try:
                vendor = int(line[:4], 16)
            except ValueError:
                current = None
                continue
            current = {}
            result[vendor] = (line[4:].strip(), current)
        elif current is not None and not line.startswith("\t\t"):
            try:
                current[int(line[1:5], 16)] = line[5:].strip()
            except ValueError:
                continue
    return result
