"""The `qemu` backend: real VMs booting the guest image with `qemu-system-x86_64`, on this machine.

For hosts without cloud-hypervisor, and for CI, which proves the guest image boots and joins Ray for real.
The backend owns this machine's part of the guest network: it checks the bridge and the head's address
before anything starts, and hands each VM an address from the host's subnet (a stopped VM's is free again),
its tap name and MAC. Each node is a `QemuVm` (qemu/vm.py); what its guest agent gets is `GuestConfig`.
Nothing of a node is left on the host but its directory of logs, which `close()` removes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
from pathlib import Path

from provisioner import userdirs
from provisioner.envimage import LocalImage
from provisioner.errors import SpecError
from provisioner.events import NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.hosts import Host, HostNetwork
from provisioner.net import bridge_facts, guest_mac, tap_name
from provisioner.node import GuestConfig, GuestNetwork, NodeSpec
from provisioner.processes import AdoptedProcess, terminate
from provisioner.qemu.vm import QEMU, QemuVm

RECONNECT_S = 10.0  # nothing restarts a controller's channel: a guest that loses it powers off soon


def kvm_usable() -> bool:
    """Whether /dev/kvm can run a stock kernel. Some hosts expose a /dev/kvm that cannot (nested
    virtualisation off, a para-virtualised KVM): HEARTH_QEMU_ACCEL=tcg says so where the probe cannot."""
    if os.environ.get("HEARTH_QEMU_ACCEL") in ("tcg", "kvm"):
        return os.environ["HEARTH_QEMU_ACCEL"] == "kvm"
    hardware = Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()
    return hardware and os.access("/dev/kvm", os.R_OK | os.W_OK)


class QemuBackend:
    name = "qemu"
    physical_gpus = False

    def __init__(self, hosts: list[Host], run_dir: Path, head_host: str) -> None:
        if len(hosts) != 1 or hosts[0].address != "local":
            raise SpecError("the qemu backend runs VMs on this machine: give one host, address: local")
        if shutil.which(QEMU) is None:
            raise SpecError(f"{QEMU} not found: apt-get install qemu-system-x86")
        network = hosts[0].network
        self.gateway = _gateway(network)
        if ipaddress.ip_address(head_host) != self.gateway.ip:
            raise SpecError(f"head_host is {head_host}, but the guests reach this machine at {self.gateway.ip} "
                            f"(bridge {network.bridge}): set head_host: {self.gateway.ip} in the hosts file")
        self.bridge = network.bridge
        self.run_dir = run_dir
        self.accel = "kvm" if kvm_usable() else "tcg"
        self._addresses = [ip for ip in network.subnet.hosts() if ip != self.gateway.ip]
        self._vms: dict[ipaddress.IPv4Address, QemuVm] = {}  # by guest address; a stopped VM's is free again
        self._env: LocalImage | None = None

    async def open(self) -> list:
        """Clear what a controller that was killed left in this run directory (its QEMUs power off by
        themselves, but a new node must not meet one still holding its tap). The directory is this user's alone
        (userdirs.py), checked first: the pid files read here and the scripts QEMU runs as root live in it."""
        userdirs.ensure(self.run_dir, "VM directory")
        for stale in self.run_dir.glob("*/"):
            await _end_stale(stale / "qemu.pid")
            shutil.rmtree(stale, ignore_errors=True)
        return []

    async def free(self) -> list:
        return []  # no GPUs under QEMU

    async def carry(self, image: LocalImage) -> dict[str, dict]:
        """The VMs run on this machine: they attach the controller's cached image as it is."""
        self._env = image
        return {"local": {"already_there": True, "bytes_sent": 0, "seconds": 0.0}}

    async def close(self) -> None:
        """After the last node stopped: their logs go too."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def node(self, spec: NodeSpec, history: NodeHistory, on_event: OnEvent | None) -> QemuVm:
        free = [ip for ip in self._addresses if ip not in self._vms or self._vms[ip].history.state == NodeState.stopped]
        if not free:
            raise SpecError(f"subnet {self.gateway.network} has no address left for {spec.id}: "
                            "give the host a larger subnet")
        ip = free[0]
        network = GuestNetwork(address=f"{ip}/{self.gateway.network.prefixlen}", gateway=str(self.gateway.ip),
                               mac=guest_mac(ip))
        guest = GuestConfig.for_node(spec, network=network, reconnect_s=RECONNECT_S)
        env_disk = None
        if spec.env_image is not None:
            if self._env is None or self._env.sha256 != spec.env_image.sha256:
                raise SpecError(f"env image {spec.env_image.sha256[:12]} was not carried to this backend first")
            env_disk = self._env.path
        self._vms[ip] = QemuVm(spec, self.run_dir, guest, NodeTracker(history, on_event), accel=self.accel,
                               network={"tap": tap_name(ip), "mac": network.mac, "bridge": self.bridge},
                               env_disk=env_disk)
        return self._vms[ip]


def _gateway(network: HostNetwork) -> ipaddress.IPv4Interface:
    """The bridge's address in the host's subnet: the guests' gateway, where the head listens."""
    fix = (f"ip link add {network.bridge} type bridge && ip addr add <first address of the subnet>/<prefix> dev "
           f"{network.bridge} && ip link set {network.bridge} up (or the hearth_network Ansible role)")
    if network.subnet is None:
        raise SpecError(f"the qemu backend needs the host's network.subnet (the guests' addresses on bridge "
                        f"{network.bridge}): add it to the hosts file, and make the bridge: {fix}")
    facts = bridge_facts(network.bridge)
    if not facts["exists"] or not facts["up"]:
        raise SpecError(f"bridge {network.bridge} is {'down' if facts['exists'] else 'missing'}: {fix}")
    inside = [ipaddress.IPv4Interface(a) for a in facts["addresses"] if ipaddress.IPv4Interface(a).ip in network.subnet]
    if not inside:
        raise SpecError(f"bridge {network.bridge} has no address in {network.subnet} "
                        f"(it has {', '.join(facts['addresses']) or 'none'}): {fix}")
    return ipaddress.IPv4Interface(f"{inside[0].ip}/{network.subnet.prefixlen}")


async def _end_stale(pidfile: Path) -> None:
    """End the QEMU a pid file names, if it still runs and is that node's (its command line names the file)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        process = AdoptedProcess(pid)  # held by a pidfd from here: a reused pid cannot be hit
        try:
            if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                await terminate(process, 0)
        finally:
            process.close()
