"""Shared fixtures. The Cloud Hypervisor contract test is moved to the end of the run, so it sees every
request the client sent during the suite."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from provisioner.ch.api import ChClient

SENT: list[tuple[str, str, object]] = []
ChClient.observers.append(lambda method, endpoint, body: SENT.append((method, endpoint, body)))

VENV_BIN = Path(sys.executable).parent
STANDIN = str(VENV_BIN / "cloud-hypervisor-standin")
GUEST = [sys.executable, str(Path(__file__).parent / "guests/channel_guest.py")]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.name.startswith("test_contract_"))


@pytest.fixture
def run_dir():
    """A short directory for per-node sockets (a Unix socket path must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hearth-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm_files(tmp_path):
    """Stand-ins for a guest kernel, initramfs and image: files CH would open; the stand-in boots none."""
    files = {}
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0" * 4096)
    return files
