"""One cloud-hypervisor process running one node's VM (a `VmDriver`, see vm.py): start, boot, watch, stop,
and leave nothing behind.

Start, in order (any failure stops what was started, removes what was made, and re-raises):
    1. check the binary and the socket paths                               (nothing exists yet)
    2. tap (if asked), scratch disk, guest channel socket
    3. spawn `cloud-hypervisor --api-socket path=... --event-monitor fd=N --log-file ... --seccomp true`
       in its own session, the event stream on a pipe
    4. wait for the socket, `vmm.ping`, check the version                  -> vmm_started
    5. `vm.create`, then `vm.boot`, bounded by what is left of the node's boot deadline   -> booting
    6. the guest says hello on the guest channel                           -> guest_up
Stop: the guest agent's "stop" and the power button (for a guest without an agent), and the grace to power
off; then SIGTERM (CH ends cleanly on it), SIGKILL; then sockets, lock, scratch disk, tap.
A guest poweroff (CH's `vm/shutdown` event) stops the node; any other exit fails it.

A controller's VMMs die with it (PR_SET_PDEATHSIG). The host agent's outlive it (`tied_to_parent=False`),
so an agent restart keeps its VMs: the new agent `adopt`s each running VMM by its pid and API socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from provisioner.ch.api import ChClient, check_version
from provisioner.ch.config import VmSpec, vm_config
from provisioner.ch.monitor import EventStream, VmmEvent
from provisioner.errors import SpecError, VmmError, VmmExited, VmmTimeout
from provisioner.events import TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.guest_channel import GUEST_PORT, GuestChannel
from provisioner.net import create_tap, delete_tap
from provisioner.node import GuestConfig
from provisioner.processes import AdoptedProcess, die_with_parent
from provisioner.vm import VmDriver

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class ChVm(VmDriver):
    vmm = "cloud-hypervisor"

    def __init__(self, spec: VmSpec, run_dir: Path, guest: GuestConfig, *, binary: str = "cloud-hypervisor",
                 history: NodeHistory | None = None, on_event: OnEvent | None = None,
                 env: dict[str, str] | None = None, api_timeout: float = 5.0, start_timeout: float = 30.0,
                 create_tap: bool = False, bridge: str | None = None, scratch_mib: int = 0,
                 tied_to_parent: bool = True) -> None:
        super().__init__(spec.node_id, run_dir / spec.node_id,
                         NodeTracker(history or NodeHistory(spec.node_id), on_event))
        self.spec = spec
        self.guest = guest
        self.link.expected = list(guest.gpus)  # the guest must find these (guest_channel.GuestLink)
        self.binary = binary
        self.env = env
        self.api_timeout, self.start_timeout = api_timeout, start_timeout
        self.make_tap, self.bridge, self.scratch_mib = create_tap, bridge, scratch_mib
        self.tied_to_parent = tied_to_parent
        self.api_socket = self.dir / "api.sock"
        self.vsock_socket = self.dir / "vsock.sock"
        self.scratch = self.dir / "scratch.img"
        self.vmm_events: list[VmmEvent] = []
        self.client: ChClient | None = None
        self._binary: str | None = None
        self._tap_made = False

    # -- start, step by step ---------------------------------------------------------------------
    def _check(self) -> None:
        self._binary = shutil.which(self.binary)
        if self._binary is None:
            raise SpecError(f"cloud-hypervisor binary {self.binary!r} not found or not executable; install "
                            "cloud-hypervisor (the Ansible role does) or pass its path as binary=")
        longest = f"{self.vsock_socket}_{GUEST_PORT}"
        if len(longest) > UNIX_PATH_MAX:
            raise SpecError(f"socket path {longest} is {len(longest)} bytes, over the {UNIX_PATH_MAX} a Unix "
                            "socket allows; use a shorter run directory")
        if self.dir.exists() and any(self.dir.glob("*.sock")):
            raise SpecError(f"{self.dir} already holds sockets: is node {self.spec.node_id} running already? "
                            "Stop it, or remove the directory if it is stale")
        if self.history.state is None:
            self.tracker.transition(NodeState.requested)
            self.tracker.transition(NodeState.placed)

    async def _start(self, deadline: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.make_tap and self.spec.tap:
            create_tap(self.spec.tap, self.bridge)
            self._tap_made = True
        spec = self.spec
        if self.scratch_mib:
            with open(self.scratch, "wb") as scratch:
                scratch.truncate(self.scratch_mib << 20)
            spec = spec.model_copy(update={"scratch_disk": self.scratch})
        self.channel = GuestChannel(Path(f"{self.vsock_socket}_{GUEST_PORT}"), self.guest, self.link.on_message)
        await self.channel.start()
        read_end, write_end = os.pipe()
        try:
            log = open(self.vmm_log, "ab")
            self.link.spawned_at = time.time()
            self.process = await asyncio.create_subprocess_exec(
                self._binary, "--api-socket", f"path={self.api_socket}", "--event-monitor", f"fd={write_end}",
                "--log-file", str(self.vmm_log), "--seccomp", "true", "-v",
                pass_fds=(write_end,), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=None if self.env is None else {**os.environ, **self.env},
                preexec_fn=die_with_parent if self.tied_to_parent else None)
            log.close()
        finally:
            os.close(write_end)
        self._tasks.append(asyncio.create_task(self._read_events(read_end)))
        self._watch()
        self.client = ChClient(str(self.api_socket), timeout=self.api_timeout)
        await self._wait_for_api(min(deadline, time.monotonic() + self.start_timeout))
        self.tracker.transition(NodeState.vmm_started)
        config = vm_config(spec, vsock_socket=self.vsock_socket, serial_log=self.serial_log)
        await self._api("vm.create", self.client.create(config))
        self.tracker.transition(NodeState.booting, spec.layout.describe() if spec.layout else None)
        budget = max(deadline - time.monotonic(), 0.001)
        try:
            await self._api("vm.boot", self.client.boot(timeout=budget))
        except VmmTimeout:
            raise VmmTimeout(f"cloud-hypervisor vm.boot did not answer before the node's boot deadline "
                             f"({budget:.1f} s after it was asked)") from None

    async def _wait_for_api(self, until: float) -> None:
        """Poll for the API socket, soon at first (CH is up in milliseconds), then less often: a host agent
        starting dozens of VMMs at once must not spend its CPU asking."""
        pause = 0.005
        while True:
            if self.process.returncode is not None:
                raise VmmExited(f"before its API was up: {self.exit_detail or 'cloud-hypervisor exited'}")
            if self.api_socket.exists():
                try:
                    ping = await self.client.ping()
                except VmmExited:
                    pass  # the socket is there but not listening yet
                else:
                    check_version(ping)
                    return
            if time.monotonic() > until:
                raise VmmTimeout(f"cloud-hypervisor's API socket {self.api_socket} did not answer within "
                                 f"{self.start_timeout:g} s")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.05)

    async def _api(self, endpoint: str, call) -> Any:
        """Await an API call, but give up at once if the process dies meanwhile, and say how it ended."""
        call_task = asyncio.ensure_future(call)
        exit_task = asyncio.ensure_future(self.exited.wait())
        done, _ = await asyncio.wait({call_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
        exit_task.cancel()
        if call_task in done:
            try:
                return call_task.result()
            except VmmExited:  # the connection dropped: did the process die under it?
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), 1.0)
                if not self.exited.is_set():
                    raise
        else:
            call_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, VmmError):
                await call_task
        raise VmmExited(f"during {endpoint}: {self.exit_detail or 'cloud-hypervisor exited'}")

    # -- adoption (a restarted host agent) ---------------------------------------------------------
    async def adopt(self, process: AdoptedProcess, *, made_tap: bool) -> None:
        """Take over a VMM an earlier agent started (it runs, `vm.boot` had answered), held by its pidfd
        (`AdoptedProcess.adopt`): watch its process, serve its guest channel again. Its event monitor went
        with the earlier agent; `VmmExited` if the process is gone or does not answer as a running VM (the
        caller then cleans up)."""
        self._tap_made = made_tap
        self.process = process
        self._watch()
        self.client = ChClient(str(self.api_socket), timeout=self.api_timeout)
        info = await self.client.info()
        if info.state != "Running":
            raise VmmExited(f"VM {self.spec.node_id} is {info.state}, not Running")
        channel = Path(f"{self.vsock_socket}_{GUEST_PORT}")
        channel.unlink(missing_ok=True)  # the earlier agent's listener; the guest reconnects to ours
        self.channel = GuestChannel(channel, self.guest, self.link.on_message)
        await self.channel.start()

    async def detach(self) -> None:
        """Let go of a running VM without stopping it (its agent is going away; the next one adopts it)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        if self.channel is not None:
            await self.channel.close()

    # -- watching, stopping ------------------------------------------------------------------------
    async def _read_events(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
        stream = EventStream()
        try:
            while chunk := await reader.read(65536):
                for event in stream.feed(chunk.decode(errors="replace")):
                    self.vmm_events.append(event)
                    if event.name == "guest/panic" and self.history.state not in TERMINAL:
                        self.tracker.transition(NodeState.failed, "the guest kernel panicked")
        finally:
            transport.close()

    def _powered_off(self, code: int) -> bool:
        return any(e.name == "vm/shutdown" for e in self.vmm_events)

    async def _polite(self) -> None:
        """The guest agent powers off on the channel's "stop"; the power button is for guests without one."""
        await super()._polite()
        with contextlib.suppress(VmmError):
            await asyncio.wait_for(self.client.power_button(), self.api_timeout)
        await self.exited.wait()

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        if self.client is not None:
            await self.client.aclose()

    def _clean_up(self) -> None:
        for path in (self.api_socket, Path(f"{self.api_socket}.lock"), self.vsock_socket,
                     Path(f"{self.vsock_socket}_{GUEST_PORT}"), self.scratch):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty: kept logs keep the directory
        if self._tap_made:
            delete_tap(self.spec.tap)
            self._tap_made = False

    def remove_logs(self) -> None:
        """The logs, once nobody will ask for them (the host agent, when the VM's record goes)."""
        self.serial_log.unlink(missing_ok=True)
        self.vmm_log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

