"""One VM driver shape: what Cloud Hypervisor's `ChVm` (ch/vm.py) and QEMU's `QemuVm` (qemu/vm.py) do the
same way, for one node's VM, from the first check to a confirmed exit.

    start(deadline)   `_check()` refuses bad input before anything exists; `_start(deadline)` makes what the
                      node needs, spawns the VMM and boots the VM, bounded by the node's boot deadline.
                      Any failure: the node fails with the reason, `stop(grace=0)`, re-raise.
    the guest         its messages go through guest_channel.GuestLink: hello -> guest_up, ready ->
                      ray_joined, failed -> failed with the guest's words; `guest_profile` holds the phases
    the VMM's exit    noticed at once: a guest poweroff stops the node, anything else fails it (with the
                      VMM's last log lines), and what the node made is removed
    stop(grace)       processes.terminate: the driver's polite step (the guest agent's "stop"), SIGTERM,
                      SIGKILL, a confirmed exit; then the driver's `_clean_up()`; a VMM that will not die
                      leaves the node `stuck` and its resources are not released (its owner quarantines
                      them); `stop` again once it has gone removes them
    logs()            the serial console (kernel, initramfs, guest agent) and the VMM's own log, bounded

A driver subclass supplies `vmm` (its name), `_check`, `_start`, `_polite`, `_powered_off` and `_clean_up`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from provisioner.events import ENDING, TERMINAL, NodeState, NodeTracker
from provisioner.guest_channel import GuestChannel, GuestLink
from provisioner.processes import Child, terminate

LOG_TAIL_BYTES = 64 << 10  # per log, in logs(): enough for a boot and a Ray failure, bounded for 64 nodes


class VmDriver:
    vmm = "vmm"

    def __init__(self, node_id: str, directory: Path, tracker: NodeTracker) -> None:
        self.node_id = node_id
        self.dir = directory
        self.tracker = tracker
        self.history = tracker.history
        self.link = GuestLink(tracker)
        self.exited = asyncio.Event()
        self.process: Child | None = None
        self.channel: GuestChannel | None = None
        self.stuck = False  # it outlived SIGKILL: whatever it holds is not free
        self.serial_log = directory / "serial.log"
        self.vmm_log = directory / f"{self.vmm}.log"
        self.exit_detail = ""  # how the VMM ended, with its last log lines: set when it has
        self._tasks: list[asyncio.Task] = []
        self._starting = False
        self._stopping = False

    @property
    def guest_profile(self) -> dict[str, float]:
        return self.link.profile

    # -- the driver's steps --------------------------------------------------------------------------
    def _check(self) -> None:
        """Refuse bad input (SpecError) before anything is made."""

    async def _start(self, deadline: float) -> None:
        raise NotImplementedError

    async def _polite(self) -> None:
        """Ask the guest to power off (the first step of stop); `terminate` waits for the VMM to end."""
        if self.channel is not None:
            await self.channel.send({"op": "stop"})

    def _powered_off(self, code: int) -> bool:
        """Whether the VMM ended because its guest powered off (rather than crashed)."""
        return code == 0

    def _clean_up(self) -> None:
        """Remove what the node made (sockets, taps, disks); logs stay until the owner removes them."""

    # -- life ------------------------------------------------------------------------------------------
    async def start(self, deadline: float) -> None:
        self._check()
        self._starting = True
        try:
            await self._start(deadline)
        except BaseException as error:
            if self.history.state not in TERMINAL:
                self.tracker.transition(NodeState.failed, _reason(error))
            await self.stop(grace=0)
            raise
        finally:
            self._starting = False

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        await self.tracker.wait_for(state, timeout)

    async def stop(self, grace: float = 10.0) -> None:
        """Shut the VM down in steps, then remove everything the node made. Idempotent."""
        self._stopping = True
        if self.history.state not in ENDING:
            self.tracker.transition(NodeState.stopping)
        if self.process is not None and self.process.returncode is None:
            self.stuck = not await terminate(self.process, grace, polite=self._polite)
        else:
            self.stuck = False  # it has gone (a stuck VMM that died at last): what it held can be removed now
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self.channel is not None:
            await self.channel.close()
        if self.stuck:
            detail = f"{self.vmm} (pid {self.process.pid}) outlived SIGKILL: it is stuck, and keeps what it holds"
            if self.history.state != NodeState.failed:
                self.tracker.transition(NodeState.failed, detail)
            return  # nothing it made is removed: its tap, disks and sockets are still in use
        self._clean_up()
        if self.history.state != NodeState.stopped:
            self.tracker.transition(NodeState.stopped)

    async def logs(self) -> str:
        return "\n".join(part for part in (tail(self.serial_log), tail(self.vmm_log, f"--- {self.vmm} log ---"))
                         if part)

    # -- watching --------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Call once the VMM is spawned: notice when it ends."""
        self._tasks.append(asyncio.create_task(self._watch_process()))

    async def _watch_process(self) -> None:
        code = await self.process.wait()
        self.exit_detail = f"{self.vmm} exited with status {code}{self._log_tail()}"
        self.exited.set()
        if self._stopping:
            return
        if self._powered_off(code):
            if self.history.state not in ENDING:
                self.tracker.transition(NodeState.stopping, "the guest powered off")
        elif self.history.state not in TERMINAL:
            self.tracker.transition(NodeState.failed, self.exit_detail)
        if not self._starting:  # else start() is failing over this, and stops the node itself
            self._tasks.append(asyncio.get_running_loop().create_task(self.stop(grace=0)))

    def _log_tail(self, lines: int = 5) -> str:
        """The VMM log's last lines, on one line: a reason is read one line at a time."""
        try:
            tail = [line.strip() for line in self.vmm_log.read_text(errors="replace").strip().splitlines()[-lines:]]
        except OSError:
            return ""
        return ("; its log ends: " + " | ".join(tail)) if tail else "; its log is empty"


def tail(path: Path, heading: str = "") -> str:
    """The last LOG_TAIL_BYTES of a log (after `heading`), or "" when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(size - LOG_TAIL_BYTES, 0))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    if size > LOG_TAIL_BYTES:
        text = f"[... {size - LOG_TAIL_BYTES} earlier bytes not shown]" + text[text.find("\n"):]
    return f"{heading}\n{text}" if heading and text else text


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
