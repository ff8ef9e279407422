"""The `qemu` backend: real VMs booting the guest image with `qemu-system-x86_64`, on this machine.

For hosts without cloud-hypervisor, and for CI, which proves the guest image boots and joins Ray for real.
KVM where it works, else TCG (software emulation); direct kernel boot; the image's root filesystem shared
read-only under a per-node qcow2 layer that takes the writes; a tap on the cluster bridge (QEMU makes it,
so it goes when QEMU goes); the guest channel on a virtio-serial port named hearth.channel (QEMU connects
to this controller's Unix socket, as CH's vsock does); QMP for control. No GPUs: those need VFIO under
cloud-hypervisor.

A node's start: overlay, guest channel, QEMU -> QMP answers (vmm_started, booting) -> the guest agent's
hello (guest_up) -> its ready after `ray start` (ray_joined). Stop: "stop" on the channel (the guest powers
off), ACPI power button, QMP quit, SIGTERM, SIGKILL; then the node's directory goes.

QEMU is not tied to this process: when the controller dies, each guest sees its channel go quiet and
powers itself off after `reconnect_s` (the guest agent's dead man's switch); QEMU then exits and its tap
goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from provisioner.net import guest_mac, tap_name
from provisioner.placement import NodePlacement
from provisioner.spec import ClusterSpec, Host

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

    def __init__(self, spec: ClusterSpec, hosts: list[Host], run_dir: Path) -> None:
        if spec.gpus_per_node:
            raise SpecError("the qemu backend passes no GPUs through; use cloud-hypervisor for GPU nodes")
        remote = [h.name for h in hosts if h.address != "local"]
        if remote or len(hosts) != 1:
            raise SpecError("the qemu backend runs VMs on this machine: give one host, address: local")
        if shutil.which(QEMU) is None:
            raise SpecError(f"{QEMU} not found: apt-get install qemu-system-x86 qemu-utils")
        self.spec = spec
        self.network = hosts[0].network
        self.run_dir = run_dir
        self.accel = "kvm" if kvm_usable() else "tcg"
        self._addresses = self.network.subnet.hosts() if self.network.subnet else None
        if self._addresses is not None:
            self.gateway = next(self._addresses)

    async def open(self) -> list:
        return []

    async def close(self) -> None:
        pass

    def node(self, placement: NodePlacement, join: JoinInfo, history: NodeHistory,
             on_event: OnEvent | None) -> QemuVm:
        network = None
        if self._addresses is not None:
            ip = next(self._addresses)
            network = {"address": f"{ip}/{self.network.subnet.prefixlen}", "gateway": str(self.gateway),
                       "mac": guest_mac(ip), "tap": tap_name(ip), "bridge": self.network.bridge}
        guest = {"ray": {"address": join.address, "token": join.token, "labels": join.labels,
                         "num_cpus": join.num_cpus, "num_gpus": 0}, "env": join.env, "reconnect_s": RECONNECT_S,
                 "network": {k: network[k] for k in ("address", "gateway", "mac")} if network else None}
        return QemuVm(placement.node_id, self.spec.image, self.run_dir, guest, NodeTracker(history, on_event),
                      cpus=self.spec.cpus, memory_mib=self.spec.memory_gib * 1024, accel=self.accel, network=network)


class QemuVm:
    def __init__(self, node_id: str, image: Path, run_dir: Path, guest: dict[str, Any], tracker: NodeTracker, *,
                 cpus: int, memory_mib: int, accel: str, network: dict[str, str] | None) -> None:
        self.node_id, self.image, self.guest = node_id, image, guest
        self.dir = run_dir / node_id
        self.tracker = tracker
        self.history = tracker.history
        self.cpus, self.memory_mib, self.accel, self.network = cpus, memory_mib, accel, network
        self.process: asyncio.subprocess.Process | None = None
        self.channel: GuestChannel | None = None
        self.exited = asyncio.Event()
        self.guest_phases: dict[str, float] = {}
        self._watcher: asyncio.Task | None = None
        self._stopping = False

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
        overlay = self.dir / "disk.qcow2"
        made = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str((self.image / "rootfs.img").resolve()), "-F", "raw",
            str(overlay), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await made.communicate()
        if made.returncode != 0:
            raise VmmError(f"qemu-img could not make the node's disk layer: {output.decode().strip()}")
        self.channel = GuestChannel(self.dir / "channel.sock", self.guest, self._on_guest)
        await self.channel.start()
        argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", f"q35,accel={self.accel}", "-cpu", "host" if self.accel == "kvm" else "max",
                "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=channel,path={self.channel.path},reconnect=1",
                "-device", "virtserialport,chardev=channel,name=hearth.channel",
                "-smbios", f"type=11,value=hearth-node={self.node_id}",
                "-qmp", f"unix:{self.dir / 'qmp.sock'},server=on,wait=off",
                "-serial", f"file:{self.serial_log}"]
        if self.network:
            ifup = self.dir / "ifup"
            ifup.write_text(f"#!/bin/sh\nip link set \"$1\" master {self.network['bridge']} && ip link set \"$1\" up\n")
            ifup.chmod(0o700)
            argv += ["-netdev", f"tap,id=net0,ifname={self.network['tap']},script={ifup},downscript=no",
                     "-device", f"virtio-net-pci,netdev=net0,mac={self.network['mac']}"]
        log = open(self.dir / "qemu.log", "ab")
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._watcher = asyncio.create_task(self._watch())
        await self._qmp_ready()
        self.tracker.transition(NodeState.vmm_started, f"qemu pid {self.process.pid}, {self.accel}")
        self.tracker.transition(NodeState.booting)

    async def _qmp_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set():
                raise VmmExited(f"qemu exited with status {self.process.returncode}: {self._tail('qemu.log')}")
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
        op = message.get("op")
        if op == "hello" and self.history.state == NodeState.booting:
            self.guest_phases.update(message.get("phases") or {})
            self.tracker.transition(NodeState.guest_up, message.get("detail"))
        elif op == "ready" and self.history.state == NodeState.guest_up:
            self.guest_phases.update(message.get("phases") or {})
            self.tracker.transition(NodeState.ray_joined)
        elif op == "failed" and self.history.state not in TERMINAL:
            self.tracker.transition(NodeState.failed, f"the guest agent: {message.get('detail')}")

    async def _watch(self) -> None:
        code = await self.process.wait()
        self.exited.set()
        if self._stopping:
            return
        if self.history.state not in TERMINAL:
            if code == 0:
                self.tracker.transition(NodeState.stopping, "the guest powered off")
            else:
                self.tracker.transition(NodeState.failed, f"qemu exited with status {code}: {self._tail('qemu.log')}")
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
            steps += [(lambda: self.channel.send({"op": "stop"}), grace),
                      (lambda: self.qmp("system_powerdown"), min(grace, 5.0))]
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

