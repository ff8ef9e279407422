"""The `qemu` backend: real VMs booting the guest image with `qemu-system-x86_64`, on this machine.

For hosts without cloud-hypervisor, and for CI, which proves the guest image boots and joins Ray for real.
KVM where it works, else TCG (software emulation); direct kernel boot; the image's root filesystem on a
read-only disk shared by every node, as under Cloud Hypervisor (the guest's initramfs puts the node's
writable layer over it, in the guest's memory); a tap on the cluster bridge (QEMU makes it, so it goes when
QEMU goes); the guest channel on a virtio-serial port named hearth.channel (QEMU connects to this
controller's Unix socket, as CH's vsock does); QMP for control. No GPUs: those need VFIO under
cloud-hypervisor.

A node's start: guest channel, QEMU -> QMP answers (vmm_started, booting) -> the guest agent's hello
(guest_up) -> its ready after `ray start` (ray_joined). Stop: "stop" on the channel (the guest powers off),
QMP quit, SIGTERM, SIGKILL; then the node's directory goes. No ACPI power button: nothing in the guest
(the guest agent is PID 1) would hear it.

QEMU is not tied to this process: when the controller dies, each guest sees its channel go quiet and
powers itself off after `reconnect_s` (the guest agent's dead man's switch); QEMU then exits, and its tap
goes with it. Nothing of the node is on the host's disk but its directory of logs and sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from provisioner.backends import JoinInfo
from provisioner.errors import SpecError, VmmError, VmmExited, VmmTimeout
from provisioner.events import TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.guest_channel import GuestChannel
from provisioner.net import bridge_facts, guest_mac, tap_name
from provisioner.placement import NodePlacement
from provisioner.spec import ClusterSpec
from provisioner.hosts import Host, HostNetwork

QEMU = "qemu-system-x86_64"
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

    def __init__(self, spec: ClusterSpec, hosts: list[Host], run_dir: Path, head_host: str) -> None:
        if spec.gpus_per_node:
            raise SpecError("the qemu backend passes no GPUs through; use cloud-hypervisor for GPU nodes")
        if len(hosts) != 1 or hosts[0].address != "local":
            raise SpecError("the qemu backend runs VMs on this machine: give one host, address: local")
        if shutil.which(QEMU) is None:
            raise SpecError(f"{QEMU} not found: apt-get install qemu-system-x86")
        network = hosts[0].network
        self.gateway = _gateway(network)
        if ipaddress.ip_address(head_host) != self.gateway.ip:
            raise SpecError(f"head_host is {head_host}, but the guests reach this machine at {self.gateway.ip} "
                            f"(bridge {network.bridge}): set head_host: {self.gateway.ip} in the hosts file")
        self.spec = spec
        self.bridge = network.bridge
        self.run_dir = run_dir
        self.accel = "kvm" if kvm_usable() else "tcg"
        self._addresses = [ip for ip in network.subnet.hosts() if ip != self.gateway.ip]
        self._vms: dict[ipaddress.IPv4Address, QemuVm] = {}  # by guest address; a stopped VM's is free again

    async def open(self) -> list:
        """Clear what a controller that was killed left in this run directory (its QEMUs power off by
        themselves, but a new node must not meet one still holding its tap)."""
        for stale in self.run_dir.glob("*/"):
            await _end_stale(stale / "qemu.pid")
            shutil.rmtree(stale, ignore_errors=True)
        return []

    async def close(self) -> None:
        pass

    def node(self, placement: NodePlacement, join: JoinInfo, history: NodeHistory,
             on_event: OnEvent | None) -> QemuVm:
        free = [ip for ip in self._addresses if ip not in self._vms or self._vms[ip].history.state == NodeState.stopped]
        if not free:
            raise SpecError(f"subnet {self.gateway.network} has no address left for {placement.node_id}: "
                            "give the host a larger subnet")
        ip = free[0]
        network = {"address": f"{ip}/{self.gateway.network.prefixlen}", "gateway": str(self.gateway.ip),
                   "mac": guest_mac(ip), "tap": tap_name(ip), "bridge": self.bridge}
        guest = {"ray": {"address": join.address, "token": join.token, "labels": join.labels,
                         "num_cpus": join.num_cpus, "num_gpus": 0}, "env": join.env, "reconnect_s": RECONNECT_S,
                 "network": {k: network[k] for k in ("address", "gateway", "mac")}}
        self._vms[ip] = QemuVm(placement.node_id, self.spec.image, self.run_dir, guest, NodeTracker(history, on_event),
                               cpus=self.spec.cpus, memory_mib=self.spec.memory_gib * 1024, accel=self.accel,
                               network=network)
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
    """SIGKILL the QEMU a pid file names, if it still runs and is that node's (its command line names the file)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                await asyncio.sleep(0.05)


class QemuVm:
    def __init__(self, node_id: str, image: Path, run_dir: Path, guest: dict[str, Any], tracker: NodeTracker, *,
                 cpus: int, memory_mib: int, accel: str, network: dict[str, str]) -> None:
        self.node_id, self.image, self.guest = node_id, image, guest
        self.dir = run_dir / node_id
        self.tracker = tracker
        self.history = tracker.history
        self.cpus, self.memory_mib, self.accel, self.network = cpus, memory_mib, accel, network
        self.process: asyncio.subprocess.Process | None = None
        self.channel: GuestChannel | None = None
        self.exited = asyncio.Event()
        # Inside the boot, in seconds (from the guest's uptime, anchored by when its hello arrived): QEMU to
        # the kernel (firmware, loading), the kernel and initramfs, the guest agent to its hello, `ray start`.
        self.guest_profile: dict[str, float] = {}
        self._spawned_at = 0.0
        self._watcher: asyncio.Task | None = None
        self._stopping = False
        self._started = False
        self._exit_detail = ""

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    async def start(self) -> None:
        for name in ("vmlinuz", "initrd.img", "rootfs.img"):
            if not (self.image / name).is_file():
                raise SpecError(f"image {self.image} lacks {name}: build it with `hearth guest build`")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start()
        except BaseException as error:
            if self.history.state not in TERMINAL:
                self.tracker.transition(NodeState.failed, str(error).splitlines()[0] if str(error) else "cancelled")
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        self.channel = GuestChannel(self.dir / "channel.sock", self.guest, self._on_guest)
        await self.channel.start()
        argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", f"q35,accel={self.accel}", "-cpu", "host" if self.accel == "kvm" else "max",
                "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-drive", f"file={self.image / 'rootfs.img'},if=virtio,format=raw,readonly=on",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=channel,path={self.channel.path},reconnect=1",
                "-device", "virtserialport,chardev=channel,name=hearth.channel",
                "-smbios", f"type=11,value=hearth-node={self.node_id}",
                "-qmp", f"unix:{self.dir / 'qmp.sock'},server=on,wait=off",
                "-serial", f"file:{self.serial_log}", "-pidfile", str(self.dir / "qemu.pid")]
        ifup = self.dir / "ifup"
        ifup.write_text(f"#!/bin/sh\nip link set \"$1\" master {self.network['bridge']} && ip link set \"$1\" up\n")
        ifup.chmod(0o700)
        argv += ["-netdev", f"tap,id=net0,ifname={self.network['tap']},script={ifup},downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={self.network['mac']}"]
        log = open(self.dir / "qemu.log", "ab")
        self._spawned_at = time.time()
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._watcher = asyncio.create_task(self._watch())
        await self._qmp_ready()
        ifup.unlink()  # QEMU has made the tap by now
        self.tracker.transition(NodeState.vmm_started, f"qemu pid {self.process.pid}, {self.accel}")
        self.tracker.transition(NodeState.booting)
        self._started = True
        if self.exited.is_set():  # it ended before the watcher could know start() was done
            raise VmmExited(self._exit_detail)

    async def _qmp_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set():
                raise VmmExited(self._exit_detail)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                await self.qmp("query-status")
                return
            if time.monotonic() > deadline:
                raise VmmTimeout(f"qemu's QMP socket did not answer within {timeout:g} s")
            await asyncio.sleep(0.05)

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on a connection of its own (greeting, capabilities, the command)."""
        reader, writer = await asyncio.open_unix_connection(str(self.dir / "qmp.sock"))
        try:
            await reader.readline()  # the greeting
            for message in ({"execute": "qmp_capabilities"}, {"execute": command, **({"arguments": arguments} if arguments else {})}):
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                while True:
                    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
                    if "return" in reply or "error" in reply:
                        break
            if "error" in reply:
                raise VmmError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply["return"]
        finally:
            writer.close()

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        await self.tracker.wait_for(state, timeout)

    def _on_guest(self, message: dict[str, Any]) -> None:
        op, phases = message.get("op"), message.get("phases") or {}
        if op == "hello" and self.history.state == NodeState.booting:
            with contextlib.suppress(KeyError, TypeError):
                kernel_at = time.time() - phases["agent_s"]
                self.guest_profile.update(firmware=round(kernel_at - self._spawned_at, 3), kernel=phases["kernel_s"],
                                          agent=round(phases["agent_s"] - phases["kernel_s"], 3))
            self.tracker.transition(NodeState.guest_up, message.get("detail"))
        elif op == "ready" and self.history.state == NodeState.guest_up:
            with contextlib.suppress(KeyError, TypeError):
                self.guest_profile["ray start"] = round(phases["ray_s"] - phases["config_s"], 3)
            self.tracker.transition(NodeState.ray_joined)
        elif op == "failed" and self.history.state not in TERMINAL:
            self.tracker.transition(NodeState.failed, f"the guest agent: {message.get('detail')}")

    async def _watch(self) -> None:
        code = await self.process.wait()
        self._exit_detail = f"qemu exited with status {code}: {self._tail('qemu.log')}"
        self.exited.set()
        if self._stopping or not self._started:  # start() fails with the detail, and cleans up
            return
        if self.history.state not in TERMINAL:
            if code == 0:
                self.tracker.transition(NodeState.stopping, "the guest powered off")
            else:
                self.tracker.transition(NodeState.failed, self._exit_detail)
        asyncio.get_running_loop().create_task(self.stop(grace=0))

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        if self.history.state not in (NodeState.stopping, NodeState.stopped):
            self.tracker.transition(NodeState.stopping)
        if self.process is not None and self.process.returncode is None:
            await self._shut_down(grace)
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.history.state != NodeState.stopped:
            self.tracker.transition(NodeState.stopped)

    async def _shut_down(self, grace: float) -> None:
        steps = []
        if grace > 0:
            steps.append((lambda: self.channel.send({"op": "stop"}), grace))
        steps.append((lambda: self.qmp("quit"), 2.0))
        for step, wait in steps:
            with contextlib.suppress(OSError, VmmError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.wait_for(step(), 5)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), wait)
            if self.process.returncode is not None:
                return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
            if self.process.returncode is not None:
                return

    def _tail(self, name: str, lines: int = 5) -> str:
        try:
            return " | ".join((self.dir / name).read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

