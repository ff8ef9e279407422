"""Child processes that cannot outlive hearth: started to die with their parent, stopped as a group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it ends (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def stop_process_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the leader (`ray start --block` then stops its raylet and agents in order), wait `grace`,
    then SIGKILL the whole process group, so nothing it started can outlive it; always wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
