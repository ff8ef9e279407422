"""The host end of the guest channel: one Unix socket per VM, JSON lines both ways.

Under Cloud Hypervisor the guest connects to vsock CID 2 (the host), port `GUEST_PORT`; CH delivers that
connection to the host Unix socket `<vsock socket>_<GUEST_PORT>`, where this server listens. (QEMU's
virtio-serial port is a Unix socket too.) The protocol, guest first:

    guest: {"op": "hello", "node": "<id>", "phases": {...}}   host: {"op": "config", ...}
    guest: {"op": "ready"}                                     after `ray start` joined
    guest: {"op": "heartbeat"}                                 every few seconds
    host:  {"op": "stop"}                                      the guest powers off

Secrets (the Ray token) travel here, never on a kernel command line. A guest whose host end goes away
(its parent died) powers itself off: that is the guest side's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GUEST_PORT = 1024

Handler = Callable[[dict[str, Any]], None]


class GuestChannel:
    """Serves one VM's guest end. `on_message` sees every message the guest sends."""

    def __init__(self, path: Path, config: dict[str, Any], on_message: Handler) -> None:
        self.path = path
        self.config = config
        self.on_message = on_message
        self.last_heard: float | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def send(self, message: dict[str, Any]) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._handlers.add(asyncio.current_task())
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                self.last_heard = time.monotonic()
                if message.get("op") == "hello":
                    writer.write(json.dumps({"op": "config", **self.config}).encode() + b"\n")
                    await writer.drain()
                self.on_message(message)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(asyncio.current_task())
            writer.close()
