"""Tap devices for VMs, made and removed with iproute2 (`ip`), which every GPU host has."""

from __future__ import annotations

import ipaddress
import json
import subprocess

from provisioner.errors import NetError


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def create_tap(name: str, bridge: str | None = None) -> None:
    """A tap named `name`, up, enslaved to `bridge` when given. Raises `NetError` and leaves nothing."""
    made = _ip("tuntap", "add", "dev", name, "mode", "tap")
    if made.returncode != 0:
        hint = " (hearth needs root or CAP_NET_ADMIN)" if "not permitted" in made.stderr else ""
        raise NetError(f"cannot create tap {name}: {made.stderr.strip()}{hint}")
    steps = [("link", "set", name, "master", bridge)] if bridge else []
    steps.append(("link", "set", name, "up"))
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            delete_tap(name)
            raise NetError(f"cannot set up tap {name} (ip {' '.join(step)}): {done.stderr.strip()}")


def delete_tap(name: str) -> None:
    _ip("link", "delete", name)


def tap_exists(name: str) -> bool:
    return _ip("link", "show", name).returncode == 0


def bridge_facts(bridge: str) -> dict[str, object]:
    """Whether `bridge` exists and is up, and its IPv4 addresses (CIDR)."""
    shown = _ip("-j", "addr", "show", "dev", bridge)
    if shown.returncode != 0:
        return {"name": bridge, "exists": False, "up": False, "addresses": []}
    (link,) = json.loads(shown.stdout)
    return {"name": bridge, "exists": True, "up": "UP" in link.get("flags", []),
            "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]}


def ipv4_routes() -> list[str]:
    """Destinations of the main table's IPv4 routes, as CIDRs ("default" stays as it is)."""
    shown = _ip("-j", "-4", "route", "show")
    if shown.returncode != 0:
        return []
    return [r["dst"] if "/" in r["dst"] or r["dst"] == "default" else f"{r['dst']}/32" for r in json.loads(shown.stdout)]


def tap_name(guest: ipaddress.IPv4Address) -> str:
    """A VM's tap, named from its guest's address: unique across the cluster's range, within IFNAMSIZ
    (hth0afb0102 for 10.251.1.2)."""
    return "hth" + guest.packed.hex()


def guest_mac(guest: ipaddress.IPv4Address) -> str:
    """Locally administered, from the guest's address (unique across the range)."""
    return "52:54:" + ":".join(f"{b:02x}" for b in guest.packed)
