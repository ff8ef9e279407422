"""Shared fixtures. The Cloud Hypervisor contract test is moved to the end of the run, so it sees every
request the client sent during the suite."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from provisioner.agent.server import spawn
from provisioner.ch.api import ChClient
from provisioner.spec import Host

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


@pytest.fixture
def agents(run_dir, tmp_path):
    """Start host agents on the cloud-hypervisor STAND-IN: `agents.start(name, root=None, **options)` returns
    the `Host` that reaches it; its VMs live under `agents.vms(name)`. Stopped (SIGTERM) after the test."""

    class Agents:
        processes: dict = {}
        started_with: dict = {}

        def start(self, name: str = "a", root: Path | None = None, **options) -> Host:
            if root is None:
                root = tmp_path / f"root-{name}"
                root.mkdir(exist_ok=True)
            self.started_with[name] = (root, options)
            socket = run_dir / f"{name}.sock"
            self.processes[name] = spawn(socket, tmp_path / f"state-{name}", self.vms(name), host_root=root,
                                         cloud_hypervisor=STANDIN, log=tmp_path / f"agent-{name}.log", **options)
            return Host(name=name, agent_socket=socket)

        def restart(self, name: str) -> Host:
            root, options = self.started_with[name]
            return self.start(name, root, **options)

        def vms(self, name: str) -> Path:
            return run_dir / f"vms-{name}"

        def state(self, name: str) -> Path:
            return tmp_path / f"state-{name}"

        def stop(self, name: str, sig: int = 15) -> None:
            process = self.processes.pop(name)
            process.send_signal(sig)
            process.wait(30)

    started = Agents()
    yield started
    for name in list(started.processes):
        started.stop(name)
