"""Tap devices for VMs, made and removed with iproute2 (`ip`), which every GPU host has."""

from __future__ import annotations

import subprocess

from provisioner.errors import HearthError


class NetError(HearthError):
    pass


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def create_tap(name: str, bridge: str | None = None) -> None:
    """A tap named `name`, up, enslaved to `bridge` when given. Raises `NetError` and leaves nothing."""
    made = _ip("tuntap", "add", "dev", name, "mode", "tap")
    if made.returncode != 0:
        raise NetError(f"cannot create tap {name}: {made.stderr.strip()} (hearth needs root or CAP_NET_ADMIN)")
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
