"""The `local` backend: each node is a `ray start --block` process on this machine. No VM, no GPU.

It is the embedded default (laptops, demos, CI). A node gets the same labels and events as a VM node:
    vmm_started  the process is spawned          booting    it runs
    guest_up     it printed its first line        ray_joined  "Ray runtime started"
Ray sees `gpus_per_node` GPUs on it, as `ray.cluster_utils.Cluster` fakes them, so GPU code schedules.
Each node has its own temp dir and ports (several raylets on one machine race for Ray's defaults), dies
with the process that started it (PR_SET_PDEATHSIG), and its whole process group is ended on stop.

Nodes are forked from a launcher that imported Ray's CLI once (launcher.py), started by `open()` so that it
imports while the Ray head starts; where it cannot run (or a node's env sets RAY_ variables, which Ray may read
when it is imported), a node's `ray start` is a fresh interpreter as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import deque
from pathlib import Path

from provisioner.events import TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.launcher import Launcher
from provisioner.node import NodeSpec
from provisioner.processes import die_with_parent, signal_leader, terminate
from provisioner.ray_head import free_ports, local_env, ray_start

OUTPUT_LINES = 200  # of `ray start`'s output, kept for logs() and a failure's reason


class LocalBackend:
    name = "local"
    physical_gpus = False

    def __init__(self, work_dir: Path, *, launcher: bool = True) -> None:
        self.work_dir = work_dir
        self.use_launcher = launcher
        self._launcher: asyncio.Task | None = None

    async def open(self) -> list:
        if self.use_launcher and self._launcher is None:
            self._launcher = asyncio.create_task(self._start_launcher())  # imports while the head starts
        return []  # no GPUs: Ray's num_gpus are nominal here

    async def free(self) -> list:
        return []

    async def carry(self, image) -> dict[str, dict]:
        return {}  # the nodes run in the controller's own environment

    async def _start_launcher(self) -> Launcher | None:
        launcher = Launcher()
        try:
            await launcher.start(local_env())
        except OSError:
            return None  # nodes start as fresh interpreters
        return launcher

    async def launcher(self) -> Launcher | None:
        """The running launcher, once it has started; None when there is none."""
        if self._launcher is None:
            return None
        launcher = await asyncio.shield(self._launcher)
        return launcher if launcher is not None and launcher.running else None

    async def close(self) -> None:
        if self._launcher is not None:
            task, self._launcher = self._launcher, None
            launcher = await task if not task.cancelled() else None
            if launcher is not None:
                await launcher.close()

    def node(self, spec: NodeSpec, history: NodeHistory, on_event: OnEvent | None) -> LocalNode:
        index = spec.id.rsplit("-", 1)[-1]  # short: Ray's socket paths under it have 107 bytes
        return LocalNode(self.work_dir / index, spec, NodeTracker(history, on_event), self)


class LocalNode:
    def __init__(self, work_dir: Path, spec: NodeSpec, tracker: NodeTracker, backend: LocalBackend | None = None) -> None:
        self.dir = work_dir
        self.backend = backend
        self.guest_profile: dict[str, float] = {}  # no VM: the boot profile is the whole story
        self.spec = spec
        self.tracker = tracker
        self.history = tracker.history
        self.process: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self._stopping = False
        self._reader: asyncio.Task | None = None

    async def start(self, deadline: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        low = free_ports(1)[0]  # a worker port range of its own, so raylets don't race for ports
        ray = self.spec.ray
        labels = ",".join(f"{k}={v}" for k, v in ray.labels.items())
        host, _ = ray.address.rsplit(":", 1)
        argv = [*ray_start(), f"--address={ray.address}", "--block",
                f"--num-cpus={ray.num_cpus}", f"--num-gpus={ray.num_gpus}", f"--labels={labels}",
                f"--node-ip-address={host}", f"--temp-dir={self.dir}", "--disable-usage-stats",
                f"--min-worker-port={low}", f"--max-worker-port={min(low + 99, 65535)}"]
        env = local_env(**self.spec.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray.token)
        launcher = None
        # Ray's settings and the interpreter's (PYTHONHOME, PYTHONPATH, ...) are read as a process starts: a node
        # whose env sets any of them gets a fresh interpreter, not a fork of the launcher
        if self.backend is not None and not any(k.startswith(("RAY_", "PYTHON")) for k in self.spec.env):
            launcher = await self.backend.launcher()
        try:
            if launcher is not None:
                self.process = await launcher.launch(argv, env, self.dir / "output")
            else:
                self.process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent)
        except OSError as error:
            self.tracker.transition(NodeState.failed, f"cannot run ray start: {error}")
            await self.stop()
            raise
        self.tracker.transition(NodeState.vmm_started, f"pid {self.process.pid}")
        self.tracker.transition(NodeState.booting)
        self._reader = asyncio.create_task(self._follow())

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        await self.tracker.wait_for(state, timeout)

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self.tracker.state not in (NodeState.stopping, NodeState.stopped):
            self.tracker.transition(NodeState.stopping)
        if self.process is not None:
            await terminate(self.process, grace, polite=signal_leader(self.process))
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.tracker.state != NodeState.stopped:
            self.tracker.transition(NodeState.stopped)

    async def logs(self) -> str:
        return "\n".join(self.output)

    async def _follow(self) -> None:
        """Read `ray start`'s output for the boot phases; notice when the process ends."""
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            if self.tracker.state == NodeState.booting:
                self.tracker.transition(NodeState.guest_up)
            if "Ray runtime started" in line and self.tracker.state == NodeState.guest_up:
                self.tracker.transition(NodeState.ray_joined)
        code = await self.process.wait()
        self.exited.set()
        if not self._stopping and self.tracker.state not in TERMINAL:
            tail = [line.strip() for line in self.output if line.strip()][-4:]
            self.tracker.transition(NodeState.failed, f"ray start exited with status {code}: "
                                    + (" | ".join(tail) if tail else "it printed nothing"))
            await self.stop()
