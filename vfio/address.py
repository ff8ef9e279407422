"""PCI addresses: one canonical form, `dddd:bb:dd.f` in lower case, as sysfs names devices.

Accepted on input: the sysfs form, lspci's short form `bb:dd.f` (domain 0000), and NVML's
`00000000:3B:00.0` (eight-digit domain, upper case). Anything else is rejected before it can become
part of a path, so an address from a user or a file can never name anything but a PCI device directory.
"""

from __future__ import annotations

import re

from vfio.errors import SpecError

_ADDRESS = re.compile(
    r"(?:(?P<domain>[0-9a-f]{4}|[0-9a-f]{8}):)?(?P<bus>[0-9a-f]{2}):(?P<dev>[0-1][0-9a-f])\.(?P<fn>[0-7])"
)
_DRIVER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def parse_address(text: str) -> str:
    """The canonical sysfs form of a PCI address, or `SpecError` naming the accepted forms."""
    match = _ADDRESS.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or int(match["domain"] or "0", 16) > 0xFFFF:
        raise SpecError(
            f"{text!r} is not a PCI address; use the sysfs form 0000:3b:00.0 "
            "(lspci's 3b:00.0 and NVML's 00000000:3B:00.0 are accepted too)"
        )
    domain = int(match["domain"] or "0", 16)
    return f"{domain:04x}:{match['bus']}:{match['dev']}.{match['fn']}"


def slot_of(address: str) -> str:
    """`dddd:bb:dd`, the physical slot: the functions of one card share it."""
    return address.rsplit(".", 1)[0]


def parse_driver(name: str) -> str:
    """A kernel driver name, validated because it becomes a sysfs directory name."""
    if not isinstance(name, str) or not _DRIVER.fullmatch(name):
        raise SpecError(
            f"{name!r} is not a kernel driver name; use a name as listed in /sys/bus/pci/drivers, such as nvidia"
        )
    return name
