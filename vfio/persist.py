"""Bindings that survive a reboot: hearth's record, and the other ways admins make them.

`hearth vfio bind --persist` records each device in `/etc/hearth/vfio-pci.conf` with its vendor:device
ids, one per line (`0000:3b:00.0 10de:2330`). At boot the `hearth-vfio-bind.service` unit runs
`hearth vfio bind --persisted`, which re-binds exactly those addresses and refuses any whose ids no longer
match (a card moved or was replaced; binding whatever now sits there would be wrong).
Bindings made by driverctl (`/etc/driverctl.d/pci-<address>`) or by vfio-pci's `ids=` option count too.
"""

from __future__ import annotations

import os
import re

from vfio.errors import SpecError
from vfio.address import parse_address
from vfio.hostroot import HostRoot
from vfio.pci import PciDevice

RECORD = "/etc/hearth/vfio-pci.conf"
_IDS_OPTION = re.compile(r"vfio[-_]pci\.?\s*ids=([0-9a-fA-F:,]+)")


def read_record(host: HostRoot) -> dict[str, str] | None:
    """Recorded address -> `vvvv:dddd`, or None when there is no record at all."""
    path = host.path(RECORD)
    if not path.is_file():
        return None
    record = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 2 or not re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{4}", fields[1]):
                raise SpecError("expected 'ADDRESS VENDOR:DEVICE'")
            record[parse_address(fields[0])] = fields[1]
        except SpecError as error:
            raise SpecError(f"{path}:{number}: {error}; fix or remove the line") from None
    return record


def write_record(host: HostRoot, record: dict[str, str]) -> None:
    """Replace the record atomically (write a temp file, rename), so a crash never leaves half of it."""
    path = host.path(RECORD)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Devices hearth binds to vfio-pci at boot (hearth vfio bind --persist). ADDRESS VENDOR:DEVICE"]
    lines += [f"{address} {ids}" for address, ids in sorted(record.items())]
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("\n".join(lines) + "\n")
    os.replace(temp, path)


def boot_binding(host: HostRoot, device: PciDevice, record: dict[str, str] | None) -> str | None:
    """Where the device's vfio-pci binding at boot comes from, or None if nothing re-applies it."""
    if record and record.get(device.address) == device.ids:
        return f"hearth ({RECORD})"
    try:
        if host.path("etc/driverctl.d", f"pci-{device.address}").read_text().strip() == "vfio-pci":
            return "driverctl"
    except OSError:
        pass
    sources = [("proc/cmdline", "kernel command line")]
    modprobe = host.path("etc/modprobe.d")
    if modprobe.is_dir():
        sources += [(f"etc/modprobe.d/{name}", f"/etc/modprobe.d/{name}") for name in sorted(os.listdir(modprobe))]
    for relative, label in sources:
        try:
            text = host.path(relative).read_text()
        except OSError:
            continue
        for ids in _IDS_OPTION.findall(text):
            if device.ids in ids.lower().split(","):
                return f"vfio-pci ids= in {label}"
    return None
