"""A fleet of GPU hosts on this machine, for benchmarks: host agents on the cloud-hypervisor stand-in, each
with a sysfs-shaped tree of its own (8 GPUs on vfio-pci, each its own IOMMU group, `/dev/vfio/N`), some
reached through a loopback OpenSSH server as remote hosts are.

The package ships it (not the test fixtures in tests/, which are not installed) so that `hearth bench boot
--hosts 32` runs anywhere hearth is installed; the trees hold only what the agent and the stand-in read.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.agent.server import spawn
from provisioner.hosts import Host

SSHD = "/usr/sbin/sshd"
GPUS_PER_HOST = 8


def gpu_host_tree(root: Path, gpus: int = GPUS_PER_HOST) -> list[str]:
    """Lay out a host with `gpus` H100s (10de:2330) already on vfio-pci, each alone in its IOMMU group, half on
    each NUMA node; returns their addresses."""
    sys_dir = root / "sys"
    driver = sys_dir / "bus/pci/drivers/vfio-pci"
    for d in (sys_dir / "bus/pci/devices", driver, sys_dir / "kernel/iommu_groups", root / "dev/vfio"):
        d.mkdir(parents=True, exist_ok=True)
    addresses = []
    for index in range(gpus):
        address = f"0000:{0x18 + 0x10 * index:02x}:00.0"
        base = sys_dir / "devices/pci0000:00" / address
        base.mkdir(parents=True)
        for name, value in (("vendor", "0x10de"), ("device", "0x2330"), ("class", "0x030200"),
                            ("numa_node", str(index * 2 // gpus)), ("driver_override", "vfio-pci")):
            (base / name).write_text(value + "\n")
        group = root / "sys/kernel/iommu_groups" / str(20 + index)
        (group / "devices").mkdir(parents=True)
        (group / "type").write_text("DMA\n")
        _link(sys_dir / "bus/pci/devices" / address, base)
        _link(group / "devices" / address, base)
        _link(base / "iommu_group", group)
        _link(base / "driver", driver)
        _link(driver / address, base)
        (root / "dev/vfio" / str(20 + index)).touch()
        addresses.append(address)
    return addresses


def _link(path: Path, target: Path) -> None:
    os.symlink(os.path.relpath(target, path.parent), path)


@dataclass
class Fleet:
    """Host agents (processes) and the `Host`s that reach them."""
    hosts: list[Host] = field(default_factory=list)
    agents: list[subprocess.Popen] = field(default_factory=list)
    sshd: subprocess.Popen | None = None

    def close(self) -> None:
        for agent in self.agents:
            agent.terminate()
        for agent in self.agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(30)
        if self.sshd is not None:
            self.sshd.terminate()
            self.sshd.wait(10)


@contextlib.contextmanager
def fleet(directory: Path, hosts: int, *, standin: str, ssh_every: int = 4, gpus: bool = True,
          max_concurrent_boots: int | None = None) -> Iterator[Fleet]:
    """`hosts` agents under `directory` (short: VM sockets live under it); every `ssh_every`-th host (0: none)
    is reached through a loopback sshd, the rest on their sockets. Without an sshd binary, all are local."""
    made = Fleet()
    try:
        ssh = None
        if ssh_every and hosts > 1 and os.path.exists(SSHD):
            made.sshd, ssh = loopback_sshd(directory / "sshd")

        def start(index: int) -> tuple[Host, subprocess.Popen]:
            name = f"h{index}"
            root = directory / name / "root"
            root.mkdir(parents=True)
            if gpus:
                gpu_host_tree(root)
            socket_path = directory / name / "agent.sock"
            agent = spawn(socket_path, directory / name / "state", directory / name / "v", host_root=root,
                          cloud_hypervisor=standin, log=directory / name / "agent.log", timeout=120)
            host = Host(name=name, agent_socket=socket_path, max_concurrent_boots=max_concurrent_boots)
            if ssh is not None and index % ssh_every == ssh_every - 1:
                host = host.model_copy(update={"address": ssh["address"], "ssh_identity": ssh["identity"],
                                               "ssh_known_hosts": ssh["known_hosts"]})
            return host, agent

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(start, index) for index in range(hosts)]
            for future in futures:  # in order; every started agent is kept, so close() ends it
                with contextlib.suppress(Exception):
                    made.agents.append(future.result()[1])
            made.hosts = [future.result()[0] for future in futures]  # raises the first failure
        yield made
    finally:
        made.close()


def loopback_sshd(directory: Path) -> tuple[subprocess.Popen, dict]:
    """An OpenSSH server on 127.0.0.1 with its own host key and a client key it accepts for this user (as the
    test suite's fixture has it): what a controller goes through to reach a remote host's agent."""
    directory.mkdir(parents=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory}/host_key\nPidFile {directory}/sshd.pid\n"
        f"AuthorizedKeysFile {directory}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowTcpForwarding local\n"
        "AllowStreamLocalForwarding local\nMaxSessions 1000\nMaxStartups 100\n")
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    log = open(directory / "sshd.log", "wb")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(directory / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()[-1000:]}")
        time.sleep(0.05)
    host_key = (directory / "host_key.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    return server, {"address": f"ssh://{getpass.getuser()}@127.0.0.1:{port}", "identity": directory / "client_key",
                    "known_hosts": directory / "known_hosts"}
