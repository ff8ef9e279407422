"""One cloud-hypervisor process running one node's VM: start, boot, watch, stop, and leave nothing behind.

Start, in order (any failure stops what was started, removes what was made, and re-raises):
    1. check the spec, the binary and the socket paths        (nothing exists yet)
    2. tap (if asked), scratch disk, guest channel socket
    3. spawn `cloud-hypervisor --api-socket path=... --event-monitor fd=N --log-file ... --seccomp true`
       in its own session, the event stream on a pipe
    4. wait for the socket, `vmm.ping`, check the version                -> vmm_started
    5. `vm.create`, then `vm.boot` with its long timeout                  -> booting
    6. the guest says hello on the guest channel                          -> guest_up
Stop, in steps, each bounded: "stop" on the guest channel and the power button, and wait (the guest
powers off cleanly), `vm.shutdown`, `vmm.shutdown`, SIGTERM, SIGKILL; then sockets, lock, scratch disk,
tap (logs only on request).
A process that ends by itself is noticed at once: a guest poweroff stops the node, anything else fails it.

A controller's VMMs die with it (PR_SET_PDEATHSIG). The host agent's outlive it (`tied_to_parent=False`),
so an agent restart keeps its VMs: the new agent `adopt`s each running VMM by its pid and API socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from provisioner.ch.api import BOOT_TIMEOUT, ChClient, check_version
from provisioner.ch.config import VmSpec, vm_config
from provisioner.ch.monitor import EventStream, VmmEvent
from provisioner.errors import SpecError, VmmError, VmmExited, VmmTimeout
from provisioner.events import TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.guest_channel import GUEST_PORT, GuestChannel
from provisioner.net import create_tap, delete_tap
from provisioner.processes import die_with_parent

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class ChVm:
    def __init__(self, spec: VmSpec, run_dir: Path, *, binary: str = "cloud-hypervisor",
                 history: NodeHistory | None = None, on_event: OnEvent | None = None,
                 guest_config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 api_timeout: float = 5.0, start_timeout: float = 30.0, boot_timeout: float = BOOT_TIMEOUT,
                 create_tap: bool = False, bridge: str | None = None, scratch_mib: int = 0,
                 tied_to_parent: bool = True) -> None:
        self.spec = spec
        self.dir = run_dir / spec.node_id
        self.binary = binary
        self.tracker = NodeTracker(history or NodeHistory(spec.node_id), on_event)
        self.history = self.tracker.history
        self.guest_config = guest_config or {}
        self.env = env
        self.api_timeout, self.start_timeout, self.boot_timeout = api_timeout, start_timeout, boot_timeout
        self.make_tap, self.bridge, self.scratch_mib = create_tap, bridge, scratch_mib
        self.tied_to_parent = tied_to_parent
        self.api_socket = self.dir / "api.sock"
        self.vsock_socket = self.dir / "vsock.sock"
        self.serial_log = self.dir / "serial.log"
        self.vmm_log = self.dir / "cloud-hypervisor.log"
        self.scratch = self.dir / "scratch.img"
        self.vmm_events: list[VmmEvent] = []
        self.process: asyncio.subprocess.Process | AdoptedProcess | None = None
        self.client: ChClient | None = None
        self.channel: GuestChannel | None = None
        self.exited = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._cleanup: asyncio.Task | None = None  # the stop() a process that ended by itself starts
        self._tap_made = False
        self._starting = False
        self._stopping = False

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the VM; returns once `vm.boot` has answered. On any failure nothing is left running."""
        binary = self._check()
        if self.history.state is None:
            self._transition(NodeState.requested)
            self._transition(NodeState.placed)
        self._starting = True
        try:
            await self._start(binary)
        except BaseException as error:
            reason = _reason(error)
            if self.history.state not in TERMINAL:
                self._transition(NodeState.failed, reason)
            await self.stop(grace=0)
            if isinstance(error, VmmExited) and self.process is not None:
                raise VmmExited(f"{reason}{self._log_tail()}") from error
            raise
        finally:
            self._starting = False

    async def adopt(self, pid: int, *, made_tap: bool) -> None:
        """Take over a VMM an earlier agent started (it runs, `vm.boot` had answered): watch its process,
        serve its guest channel again. Its event monitor went with the earlier agent; `VmmExited` if the
        process is gone or does not answer as a running VM (the caller then cleans up)."""
        self._tap_made = made_tap
        self.process = AdoptedProcess(pid)
        self._tasks.append(asyncio.create_task(self._watch_process()))
        self.client = ChClient(str(self.api_socket), timeout=self.api_timeout)
        info = await self.client.info()
        if info.state != "Running":
            raise VmmExited(f"VM {self.spec.node_id} is {info.state}, not Running")
        channel = Path(f"{self.vsock_socket}_{GUEST_PORT}")
        channel.unlink(missing_ok=True)  # the earlier agent's listener; the guest reconnects to ours
        self.channel = GuestChannel(channel, self.guest_config, self._on_guest)
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

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        await self.tracker.wait_for(state, timeout)

    async def stop(self, grace: float = 10.0, remove_logs: bool = False) -> None:
        """Shut the VM down in steps, then remove everything the node made. Idempotent."""
        self._stopping = True
        if self.history.state not in (NodeState.stopping, NodeState.stopped):
            self._transition(NodeState.stopping)
        if self.process is not None and self.process.returncode is None:
            await self._shut_down(grace)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self.client is not None:
            await self.client.aclose()
        if self.channel is not None:
            await self.channel.close()
        self._clean_up(remove_logs)
        if self.history.state != NodeState.stopped:
            self._transition(NodeState.stopped)

    # -- start, step by step ---------------------------------------------------------------------
    def _check(self) -> str:
        binary = shutil.which(self.binary)
        if binary is None:
            raise SpecError(f"cloud-hypervisor binary {self.binary!r} not found or not executable; install "
                            "cloud-hypervisor (the Ansible role does) or pass its path as binary=")
        longest = f"{self.vsock_socket}_{GUEST_PORT}"
        if len(longest) > UNIX_PATH_MAX:
            raise SpecError(f"socket path {longest} is {len(longest)} bytes, over the {UNIX_PATH_MAX} a Unix "
                            "socket allows; use a shorter run directory")
        if self.dir.exists() and any(self.dir.glob("*.sock")):
            raise SpecError(f"{self.dir} already holds sockets: is node {self.spec.node_id} running already? "
                            "Stop it, or remove the directory if it is stale")
        return binary

    async def _start(self, binary: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.make_tap and self.spec.tap:
            create_tap(self.spec.tap, self.bridge)
            self._tap_made = True
        spec = self.spec
        if self.scratch_mib:
            with open(self.scratch, "wb") as scratch:
                scratch.truncate(self.scratch_mib << 20)
            spec = spec.model_copy(update={"scratch_disk": self.scratch})
        self.channel = GuestChannel(Path(f"{self.vsock_socket}_{GUEST_PORT}"), self.guest_config, self._on_guest)
        await self.channel.start()
        read_end, write_end = os.pipe()
        try:
            log = open(self.vmm_log, "ab")
            self.process = await asyncio.create_subprocess_exec(
                binary, "--api-socket", f"path={self.api_socket}", "--event-monitor", f"fd={write_end}",
                "--log-file", str(self.vmm_log), "--seccomp", "true", "-v",
                pass_fds=(write_end,), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=None if self.env is None else {**os.environ, **self.env},
                preexec_fn=die_with_parent if self.tied_to_parent else None)
            log.close()
        finally:
            os.close(write_end)
        self._tasks.append(asyncio.create_task(self._read_events(read_end)))
        self._tasks.append(asyncio.create_task(self._watch_process()))
        self.client = ChClient(str(self.api_socket), timeout=self.api_timeout)
        await self._wait_for_api()
        self._transition(NodeState.vmm_started)
        config = vm_config(spec, vsock_socket=self.vsock_socket, serial_log=self.serial_log)
        await self._api("vm.create", self.client.create(config))
        self._transition(NodeState.booting)
        await self._api("vm.boot", self.client.boot(timeout=self.boot_timeout))

    async def _wait_for_api(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.returncode is not None:
                raise VmmExited(f"cloud-hypervisor exited with status {self.process.returncode} before its API was up")
            if self.api_socket.exists():
                try:
                    ping = await self.client.ping()
                except VmmExited:
                    pass  # the socket is there but not listening yet
                else:
                    check_version(ping)
                    return
            if time.monotonic() > deadline:
                raise VmmTimeout(f"cloud-hypervisor's API socket {self.api_socket} did not answer within "
                                 f"{self.start_timeout:g} s")
            await asyncio.sleep(0.01)

    async def _api(self, endpoint: str, call) -> Any:
        """Await an API call, but give up at once if the process dies meanwhile, and say so."""
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
        raise VmmExited(f"cloud-hypervisor exited with status {self.process.returncode} during {endpoint}")

    # -- watching --------------------------------------------------------------------------------
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
                        self._transition(NodeState.failed, "the guest kernel panicked")
        finally:
            transport.close()

    async def _watch_process(self) -> None:
        code = await self.process.wait()
        self.exited.set()
        if self._stopping:
            return
        if any(e.name == "vm/shutdown" for e in self.vmm_events):
            self._transition(NodeState.stopping, "the guest powered off")
        elif self.history.state not in TERMINAL:
            self._transition(NodeState.failed, f"cloud-hypervisor exited with status {code}{self._log_tail()}")
        if not self._starting:  # else start() is failing over this and stops the node itself
            self._cleanup = asyncio.get_running_loop().create_task(self.stop(grace=0))

    def _on_guest(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "hello" and self.history.state == NodeState.booting:
            self._transition(NodeState.guest_up, message.get("detail"))
        elif op == "ready" and self.history.state == NodeState.guest_up:
            self._transition(NodeState.ray_joined)

    def _transition(self, state: NodeState, detail: str | None = None) -> None:
        self.tracker.transition(state, detail)

    # -- stop, step by step ----------------------------------------------------------------------
    async def _ask_guest_to_stop(self) -> None:
        """The guest agent powers off on the channel's "stop"; the power button is for guests without one."""
        if self.channel is not None:
            await self.channel.send({"op": "stop"})
        await self.client.power_button()

    async def _shut_down(self, grace: float) -> None:
        steps = []
        if grace > 0:
            steps.append((self._ask_guest_to_stop, grace))
        steps += [(self.client.shutdown, 0), (self.client.shutdown_vmm, 2.0)]
        for call, wait in steps:
            with contextlib.suppress(VmmError, asyncio.TimeoutError):  # a hung API must not hold us up
                await asyncio.wait_for(call(), min(self.api_timeout, 2.0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), wait)
            if self.exited.is_set():
                return
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), wait)
            if self.process.returncode is not None:
                return

    def _clean_up(self, remove_logs: bool) -> None:
        for path in (self.api_socket, Path(f"{self.api_socket}.lock"), self.vsock_socket,
                     Path(f"{self.vsock_socket}_{GUEST_PORT}"), self.scratch):
            path.unlink(missing_ok=True)
        if remove_logs:
            self.serial_log.unlink(missing_ok=True)
            self.vmm_log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty: kept logs keep the directory
        if self._tap_made:
            delete_tap(self.spec.tap)
            self._tap_made = False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.vmm_log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; last log lines:\n    " + "\n    ".join(tail)) if tail else ""


class AdoptedProcess:
    """What ChVm uses of an asyncio subprocess, for a VMM that is not our child: its exit is seen through
    a pidfd (no exit status: it is reported as 0)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)  # ProcessLookupError when it is gone already
        self._ended = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = 0
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        return 0


def vmm_pid_matches(pid: int, api_socket: Path) -> bool:
    """Whether `pid` is still the VMM serving `api_socket` (and not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"path={api_socket}".encode() in cmdline


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
