"""One asyncio event loop on a background thread, shared by every cluster and pool in the process.

The notebook faces (`Cluster`, `Pool`) are synchronous so a cell never needs `await`, and a kernel
already runs a loop of its own. Node processes are started from this thread, and they are set to die when
it ends (PR_SET_PDEATHSIG), which is when the process ends: a killed kernel takes its nodes with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="hearth-loop", daemon=True).start()
        return _loop


def submit(coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    return asyncio.run_coroutine_threadsafe(coroutine, loop())


def run(coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the loop and wait for it; Ctrl-C (KeyboardInterrupt) cancels it."""
    future = submit(coroutine)
    try:
        return future.result(timeout)
    except (KeyboardInterrupt, concurrent.futures.TimeoutError):
        future.cancel()
        raise
