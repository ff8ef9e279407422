"""One `qemu-system-x86_64` process running one node's VM (a `VmDriver`, see vm.py), on this machine.

KVM where it works, else TCG (software emulation); direct kernel boot; the image's root filesystem on a
read-only disk shared by every node, as under Cloud Hypervisor (the guest's initramfs puts the node's
writable layer over it, in the guest's memory), and the controller's environment image on a second one; a tap on the host's bridge (QEMU makes it, so it goes when
QEMU goes); the guest channel on a virtio-serial port named hearth.channel (QEMU connects to our Unix
socket, as CH's vsock does); QMP for control. No GPUs: those need VFIO under cloud-hypervisor.

Start: guest channel, QEMU -> QMP answers (vmm_started, booting) -> the guest agent's hello (guest_up) -> its
ready after `ray start` (ray_joined). Stop: "stop" on the guest channel (the guest agent powers off), then
SIGTERM (QEMU quits cleanly on it), SIGKILL; then the node's sockets go, its logs stay. No ACPI power
button: nothing in the guest (the guest agent is PID 1) would hear it.

QEMU is not tied to the controller: when the controller dies, each guest sees its channel go quiet and
powers itself off after `reconnect_s` (the guest agent's dead man's switch); QEMU then exits, and its tap
goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from provisioner import userdirs
from provisioner.errors import SpecError, VmmError, VmmExited, VmmTimeout
from provisioner.events import NodeState, NodeTracker
from provisioner.guest_channel import GuestChannel
from provisioner.node import GuestConfig, NodeSpec
from provisioner.vm import VmDriver

QEMU = "qemu-system-x86_64"


class QemuVm(VmDriver):
    vmm = "qemu"

    def __init__(self, node: NodeSpec, run_dir: Path, guest: GuestConfig, tracker: NodeTracker, *, accel: str,
                 network: dict[str, str], env_disk: Path | None = None) -> None:
        super().__init__(node.id, run_dir / node.id, tracker)
        self.node, self.guest, self.accel, self.network, self.env_disk = node, guest, accel, network, env_disk
        self.link.expected = list(guest.gpus)  # none are passed through here: a guest told to expect one refuses
        self.qmp_socket = self.dir / "qmp.sock"

    def _check(self) -> None:
        for name in ("vmlinuz", "initrd.img", "rootfs.img"):
            if not (self.node.image / name).is_file():
                raise SpecError(f"image {self.node.image} lacks {name}: build it with `hearth guest build`")

    async def _start(self, deadline: float) -> None:
        userdirs.ensure(self.dir, "VM directory")  # QEMU runs a script from here as root: this user's alone
        image = self.node.image
        self.channel = GuestChannel(self.dir / "channel.sock", self.guest, self.link.on_message)
        await self.channel.start()
        argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", f"q35,accel={self.accel}", "-cpu", "host" if self.accel == "kvm" else "max",
                "-smp", str(self.node.cpus), "-m", str(self.node.memory_mib),
                "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-drive", f"file={image / 'rootfs.img'},if=virtio,format=raw,readonly=on",
                *(("-drive", f"file={self.env_disk},if=virtio,format=raw,readonly=on") if self.env_disk else ()),
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=channel,path={self.channel.path},reconnect=1",
                "-device", "virtserialport,chardev=channel,name=hearth.channel",
                "-smbios", f"type=11,value=hearth-node={self.node.id}",
                "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                "-serial", f"file:{self.serial_log}", "-pidfile", str(self.dir / "qemu.pid")]
        ifup = self._write_ifup()
        argv += ["-netdev", f"tap,id=net0,ifname={self.network['tap']},script={ifup},downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={self.network['mac']}"]
        log = open(self.vmm_log, "ab")
        self.link.spawned_at = time.time()
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._watch()
        await self._qmp_ready(min(deadline, time.monotonic() + 20.0))
        ifup.unlink()  # QEMU has made the tap by now
        self.tracker.transition(NodeState.vmm_started, f"qemu pid {self.process.pid}, {self.accel}")
        self.tracker.transition(NodeState.booting)

    def _write_ifup(self) -> Path:
        """The script QEMU runs (as this user: root, for taps) to put the tap on the bridge. It is written fresh,
        mode 0700, never through a link, into the node's directory once that directory is checked to be this
        user's alone (userdirs.py): nobody else can have planted or can swap what QEMU runs."""
        userdirs.check(self.dir, what="VM directory")
        ifup = self.dir / "ifup"
        ifup.unlink(missing_ok=True)  # a crashed run's; the directory is ours
        fd = os.open(ifup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(f"#!/bin/sh\nip link set \"$1\" master {self.network['bridge']} && ip link set \"$1\" up\n")
        return ifup

    async def _qmp_ready(self, until: float) -> None:
        while True:
            if self.exited.is_set():
                raise VmmExited(self.exit_detail)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                await self.qmp("query-status")
                return
            if time.monotonic() > until:
                raise VmmTimeout("qemu's QMP socket did not answer in time")
            await asyncio.sleep(0.05)

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command on a connection of its own (greeting, capabilities, the command)."""
        reader, writer = await asyncio.open_unix_connection(str(self.qmp_socket))
        try:
            await reader.readline()  # the greeting
            for message in ({"execute": "qmp_capabilities"},
                            {"execute": command, **({"arguments": arguments} if arguments else {})}):
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

    async def _polite(self) -> None:
        await super()._polite()
        await self.exited.wait()

    def _clean_up(self) -> None:
        for name in ("channel.sock", "qmp.sock", "qemu.pid", "ifup"):
            (self.dir / name).unlink(missing_ok=True)
