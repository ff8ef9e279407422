"""Child processes that cannot outlive hearth: started to die with their parent, and ended by one routine.

`terminate` is the only way hearth ends a process it runs (a VMM, a local node's `ray start`, the Ray
head), as trio's `deliver_cancel` is: a polite, process-specific first step (the guest agent's "stop",
SIGTERM to `ray start --block`), then SIGTERM and SIGKILL to its whole process group, each with a bounded
wait, and a confirmed exit. Every child leads its own session (start_new_session), so its group is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

PR_SET_PDEATHSIG = 1


class Child(Protocol):
    """What `terminate` needs of a process: an asyncio subprocess, or an `AdoptedProcess`."""

    pid: int
    returncode: int | None

    async def wait(self) -> int: ...


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it ends (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def terminate(process: Child, grace: float, *, polite: Callable[[], Awaitable[object]] | None = None,
                    term_s: float = 2.0, kill_s: float = 10.0) -> bool:
    """End `process`: `polite()` (skipped when `grace` is 0) and up to `grace` seconds for it to work, then
    SIGTERM to its process group and `term_s` seconds, then SIGKILL and `kill_s` seconds. True once its
    exit is confirmed; False when it outlived SIGKILL (stuck in the kernel, e.g. in a VFIO reset): the caller
    must then not free what it holds."""
    if process.returncode is not None:
        return True
    if polite is not None and grace > 0:
        started = time.monotonic()
        with contextlib.suppress(Exception):  # a polite step that fails (a hung API) just moves us on
            await asyncio.wait_for(polite(), grace)
        if await _exited(process, grace - (time.monotonic() - started)):
            return True
    for sig, wait in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        with contextlib.suppress(ProcessLookupError):
            if isinstance(process, AdoptedProcess):
                process.send_signal(sig)
            else:
                os.killpg(process.pid, sig)
        if await _exited(process, wait):
            return True
    return False


async def _exited(process: Child, within: float) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), max(within, 0.0))
    return process.returncode is not None


def signal_leader(process: Child, sig: int = signal.SIGTERM) -> Callable[[], Awaitable[None]]:
    """A polite step: `sig` to the process itself only (`ray start --block` then stops its daemons in order)."""

    async def send() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)

    return send


class AdoptedProcess:
    """A process that is not our child (a VMM an earlier host agent started), held by a pidfd: its exit is
    noticed at once, and signals go through the pidfd, so they can never reach another process that reused
    its pid. Its exit status is not ours to read: it is reported as 0."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)  # ProcessLookupError when it is gone already
        self._ended = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._on_exit)

    def send_signal(self, sig: int) -> None:
        if self._fd >= 0:
            signal.pidfd_send_signal(self._fd, sig)

    def _on_exit(self) -> None:
        self.close()
        self.returncode = 0
        self._ended.set()

    def close(self) -> None:
        """Let go of the pidfd (when it was not ours to end after all)."""
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    async def wait(self) -> int:
        await self._ended.wait()
        return 0
