"""The host end of the guest channel, and what a node makes of what its guest says: the same for every VMM.

One Unix socket per VM, JSON lines both ways. Under Cloud Hypervisor the guest connects to vsock CID 2 (the
host), port `GUEST_PORT`, which CH delivers to the host Unix socket `<vsock socket>_<GUEST_PORT>`, where
`GuestChannel` listens; QEMU's virtio-serial port is a Unix socket too. The protocol, guest first:

    guest: {"op": "hello", "node": "<id>", "phases": {...},    host: {"op": "config", ...} (node.GuestConfig)
            "gpus": [{"address", "device", "name", "uuid", "memory_mib", "ecc", "persistence"}, ...],
            "gpu_driver": "550.163.01" | null, "gpu_problem": "<the driver's words>" | null}
    guest: {"op": "ready", "phases": {...}}                    after `ray start` joined
    guest: {"op": "failed", "detail": "..."}                   it cannot go on (then it powers off)
    guest: {"op": "heartbeat"}                                 every few seconds
    host:  {"op": "stop"}                                      the guest powers off

A guest that loses its host end (a host agent restarting) reconnects and says hello, and ready, again.
Secrets (the Ray token) travel here, never on a kernel command line. A guest whose host end stays away
powers itself off: that is the guest side's job (guest/agent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner.events import TERMINAL, NodeState, NodeTracker
from provisioner.node import ExpectedGpu, GuestConfig

GUEST_PORT = 1024
MAX_CONNECTIONS = 4  # a guest needs one (two for a moment while it reconnects); more is a guest misbehaving
MAX_LINE = 1 << 20

Handler = Callable[[dict[str, Any]], None]


class GuestChannel:
    """Serves one VM's guest end. `on_message` sees every message the guest sends."""

    def __init__(self, path: Path, config: GuestConfig, on_message: Handler) -> None:
        self.path = path
        self.config = config
        self.on_message = on_message
        self.last_heard: float | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
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
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.close()
            return
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
                    writer.write(json.dumps(self.config.message()).encode() + b"\n")
                    await writer.drain()
                self.on_message(message)
        except (ConnectionError, ValueError):  # ValueError: a line over MAX_LINE
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(asyncio.current_task())
            writer.close()


class GuestLink:
    """A node's reading of its guest agent, the same under every VMM:

        hello   booting -> guest_up; the phases inside the boot: VMM start to the kernel ("firmware"),
                the kernel and initramfs ("kernel"), loading the GPU driver and reading the GPUs ("gpu driver",
                when there are GPUs), the guest agent to its hello ("agent"); the GPUs it found are compared
                with those its VM was given (`expected`: count and PCI device id)
        ready   guest_up -> ray_joined; mounting the environment image ("env mount") and `ray start`'s time
        failed  -> failed, with the guest's own words

    GPUs that differ fail the node with the guest's words: at once when the hello carries the driver's own
    (modules that did not load, GPUs that did not come up), else when the guest says why after its config (it
    gets the same expectation and refuses, with modprobe's and the kernel's words), and at the latest at its
    ready (a guest agent too old to check), with the comparison's words.

    Phases come from the guest's uptime, anchored by when its hello arrived, against `spawned_at` (when the
    VMM was started, on this clock). A hello or ready repeated after a reconnect changes nothing."""

    def __init__(self, tracker: NodeTracker) -> None:
        self.tracker = tracker
        self.profile: dict[str, float] = {}
        self.spawned_at: float | None = None
        self.expected: list[ExpectedGpu] = []
        self.gpus: list[dict[str, Any]] = []  # what the guest reported in its hello
        self._gpu_mismatch: str | None = None

    def on_message(self, message: dict[str, Any]) -> None:
        op, phases, state = message.get("op"), message.get("phases") or {}, self.tracker.state
        if op == "hello" and state == NodeState.booting:
            with contextlib.suppress(KeyError, TypeError):
                kernel_at = time.time() - phases["agent_s"]
                if self.spawned_at is not None:
                    self.profile["firmware"] = round(kernel_at - self.spawned_at, 3)
                gpu_s = float(phases.get("gpu_s", 0))
                if "gpu_s" in phases:
                    self.profile["gpu driver"] = round(gpu_s, 3)
                self.profile.update(kernel=round(phases["kernel_s"], 3),
                                    agent=round(phases["agent_s"] - phases["kernel_s"] - gpu_s, 3))
            reported = message.get("gpus") if isinstance(message.get("gpus"), list) else []
            self.gpus = [g for g in reported if isinstance(g, dict)]
            self._gpu_mismatch = compare_gpus(self.expected, self.gpus)
            if self._gpu_mismatch and message.get("gpu_problem"):
                self.tracker.transition(NodeState.failed, f"the guest agent: {self._gpu_mismatch}: "
                                                          f"{message['gpu_problem']}")
                return
            self.tracker.transition(NodeState.guest_up, message.get("detail"))
        elif op == "ready" and state == NodeState.guest_up:
            if self._gpu_mismatch:
                self.tracker.transition(NodeState.failed, f"{self._gpu_mismatch} (the guest agent joined Ray anyway: "
                                                          "its image predates GPU checks; rebuild it)")
                return
            with contextlib.suppress(KeyError, TypeError):
                if "env_s" in phases:  # mounting the environment image, just before `ray start`
                    self.profile["env mount"] = round(phases["env_s"], 3)
                self.profile["ray start"] = round(phases["ray_s"] - phases["config_s"] - phases.get("env_s", 0), 3)
            self.tracker.transition(NodeState.ray_joined)
        elif op == "failed" and state not in TERMINAL:
            self.tracker.transition(NodeState.failed, f"the guest agent: {message.get('detail') or 'no reason given'}")


def compare_gpus(expected: list[ExpectedGpu], reported: list[dict[str, Any]]) -> str | None:
    """None when the guest found the GPUs its VM was given (as many, with the same PCI device ids); else what
    differs, in words."""
    want = Counter(g.device for g in expected)
    have = Counter(str(g.get("device")) for g in reported)
    if want == have:
        return None

    def said(gpus: Counter) -> str:
        return ", ".join(f"{n} x {device}" for device, n in sorted(gpus.items())) or "none"

    return (f"GPUs: the node was given {sum(want.values())} ({said(want)}), the guest found "
            f"{sum(have.values())} ({said(have)})")
