"""Child processes that cannot outlive hearth: started to die with their parent, and ended by one routine.

`terminate` is the only way hearth ends a process it runs (a VMM, a local node's `ray start`, the Ray
head), as trio's `deliver_cancel` is: a polite, process-specific first step (the guest agent's "stop",
SIGTERM to `ray start --block`), then SIGTERM and SIGKILL to its whole process group, each with a bounded
wait, and a confirmed exit. Every child leads its own session (start_new_session), so its group is its own.

A process that is not our child (a VMM an earlier host agent started, a `hearth up` supervisor named in a
state file) is reached only through a pidfd, opened before its identity is checked (`hold`): a pid that was
reused by another process since it was recorded is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
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
        if isinstance(process, AdoptedProcess):
            process.send_signal(sig)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)  # its group: what it started goes too
            if process.returncode is None:  # our own child (not reaped yet, so its pid is still its own): even
                with contextlib.suppress(ProcessLookupError):  # one that left the group it was started in
                    os.kill(process.pid, sig)
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


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (/proc/<pid>/stat, field 22): with its pid, a name no
    later process can have. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # after "pid (comm) ": field 3 is the first


def recorded(pid: int | None = None) -> dict[str, int | None]:
    """What a state file keeps of a process (default: this one) so that it is never mistaken for another that
    reused its pid later: its pid and its start time."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_ticks(pid)}


def _exited_fd(fd: int, within: float = 0.0) -> bool:
    """Whether the process a pidfd holds has ended (its pidfd reads as ready)."""
    return bool(select.select([fd], [], [], within)[0])


def hold(pid: int, is_it: Callable[[int], bool]) -> int | None:
    """A pidfd on `pid`, but only while it is still the process `is_it(pid)` recognises (its start time, its
    command line): opened first, then checked, then confirmed alive, so a pid reused in between is never
    taken for it. None when it is gone or not it. The caller closes the fd."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if is_it(pid) and not _exited_fd(fd):
        return fd
    os.close(fd)
    return None


def started_at(start: int | None) -> Callable[[int], bool]:
    """`is_it` for `hold`: the process started at `start` (ticks after boot), as `recorded` wrote."""
    return lambda pid: start is not None and start_ticks(pid) == start


def runs(*words: str) -> Callable[[int], bool]:
    """`is_it` for `hold`: each of `words` is one of the process's arguments, or part of one (a state directory,
    `path=<api socket>`), in /proc/<pid>/cmdline."""
    def is_it(pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return all(any(word.encode() in arg for arg in argv) for word in words)

    return is_it


class HeldProcess:
    """A process hearth did not start but must stop (a `hearth up` supervisor, from its state file), held by a
    pidfd once it was recognised: signals and waits reach that process, or nothing. Synchronous, for the CLI."""

    def __init__(self, fd: int, pid: int) -> None:
        self.fd, self.pid = fd, pid

    @classmethod
    def find(cls, pid: object, is_it: Callable[[int], bool]) -> HeldProcess | None:
        """The process `pid` if it runs and `is_it` recognises it (see `hold`); else None."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        fd = hold(pid, is_it)
        return None if fd is None else cls(fd, pid)

    @classmethod
    def recorded(cls, record: dict) -> HeldProcess | None:
        """The process a state file recorded (`recorded()`), if it still runs; else None."""
        return cls.find(record.get("pid"), started_at(record.get("start")))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, sig)

    def wait(self, timeout: float) -> bool:
        """True once it has ended (within `timeout` seconds)."""
        return _exited_fd(self.fd, max(timeout, 0.0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HeldProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AdoptedProcess:
    """A process that is not our child (a VMM an earlier host agent started), held by a pidfd: its exit is
    noticed at once, and signals go through the pidfd, so they can never reach another process that reused
    its pid. Its exit status is not ours to read: it is reported as 0. `adopt` opens one safely."""

    def __init__(self, pid: int, fd: int | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid) if fd is None else fd  # ProcessLookupError when it is gone already
        self._ended = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._on_exit)

    @classmethod
    def adopt(cls, pid: int, is_it: Callable[[int], bool]) -> AdoptedProcess | None:
        """The process `pid`, if it runs and `is_it(pid)` recognises it (see `hold`); else None."""
        fd = hold(pid, is_it)
        return None if fd is None else cls(pid, fd)

    def send_signal(self, sig: int) -> None:
        if self._fd >= 0:
            with contextlib.suppress(ProcessLookupError):
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
