"""The cluster's Ray head, started by the controller (the notebook kernel or `hearth up`'s supervisor).

`ray start --head --block` runs as a child process in its own session, so hearth owns it: stopping it
stops GCS, dashboard and agents, and the whole process group is killed if anything lingers. It dies with
its parent too (PR_SET_PDEATHSIG), so a controller that is killed takes its head with it.

Token authentication is on (`RAY_AUTH_MODE=token`) with a fresh token per cluster; every node, driver and
job client gets it (VMs over the guest channel, never a command line). Ports are chosen here, not by Ray,
so two clusters on one machine, and several local nodes beside the head, never collide: Ray's defaults
(dashboard agent 52365 and its random picks) race when raylets start at the same moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from guest.agent import PORT_FLAGS
from guest.agent import ray_start as ray_start_command
from provisioner.codesync import CodeTree
from provisioner.errors import RayError
from provisioner.processes import die_with_parent, signal_leader, terminate

_connected: RayHead | None = None  # the cluster this process's Ray is connected to (RayHead.connect)


def free_ports(count: int, host: str = "0.0.0.0") -> list[int]:
    """`count` distinct ports that were free a moment ago (bound together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_start() -> list[str]:
    """`ray start` with this Python (the one that has Ray), as every hearth node starts (guest/agent.py:
    patient with a slow raylet, the dashboard agent's port handed to the raylet), and with ports of its own
    for the raylet and its agents (several raylets on one machine race for Ray's defaults)."""
    return ray_start_command(sys.executable, dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)))))


def local_env(**extra: str) -> dict[str, str]:
    """The environment for a Ray process on this machine: ours, `extra`, and this Python's bin directory
    first on PATH, so that `python` in a job's entrypoint is the one that has Ray."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **extra, "PATH": path}


class RayHead:
    def __init__(self, work_dir: Path, *, host: str = "127.0.0.1", token: str | None = None,
                 start_timeout: float = 90.0) -> None:
        self.work_dir = work_dir
        self.host = host
        self.token = token or secrets.token_hex(32)
        self.start_timeout = start_timeout
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.process: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()  # the head's `ray start` ended: every node waiting to join can stop waiting
        self._http: httpx.AsyncClient | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """What every Ray process of this cluster needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def use_in_this_process(self) -> None:
        """Make `ray.init(address=head.address)` in this process authenticate with this cluster's token.

        Ray reads the mode and token once and caches them in its C++ core, so a process that already
        imported Ray (a notebook kernel, a test run) must refresh those caches after changing them.
        """
        os.environ.update(self.env)
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    def connect(self, code: CodeTree | None = None) -> None:
        """Point this process's Ray (a kernel's `ray.get`, `ray.remote`) at this cluster; with `code`, the
        notebook's code (codesync.py) is published there first and every worker starts in it.

        A process has one Ray connection. One to another cluster (or one the user made) is shut down first,
        before the token changes: a live connection whose token was swapped under it fails with Ray's
        authentication errors.
        """
        import ray

        global _connected
        if ray.is_initialized() and _connected is not self:
            ray.shutdown()
        self.use_in_this_process()
        if code is not None:
            code.publish(self.address)
        if ray.is_initialized():
            return
        runtime_env = {"worker_process_setup_hook": "provisioner.codesync.setup_worker"} if code is not None else None
        ray.init(address=self.address, logging_level="ERROR", runtime_env=runtime_env)
        _connected = self

    def disconnect(self) -> None:
        """Shut this process's Ray connection down if it is to this cluster (and leave one to another alone)."""
        import ray

        global _connected
        if _connected is self:
            _connected = None
            if ray.is_initialized():
                ray.shutdown()

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "head.log", "ab")
        self.process = await asyncio.create_subprocess_exec(
            *ray_start(), "--head", "--block", f"--port={self.gcs_port}",
            f"--node-ip-address={self.host}", f"--dashboard-host={self.host}",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
            "--num-cpus=0", "--num-gpus=0", f"--temp-dir={self.work_dir / 'h'}", "--disable-usage-stats",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            env=local_env(**self.env), start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        self._watcher = asyncio.create_task(self._watch())
        self._http = httpx.AsyncClient(base_url=self.dashboard_url, headers=self.headers, timeout=5.0)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.exited.is_set():
                    raise RayError(self.exit_reason())
                # Up when `ray start` says its node started (the raylet registered) and the dashboard answers.
                with contextlib.suppress(httpx.TransportError):
                    if ("Ray runtime started" in (self.work_dir / "head.log").read_text(errors="replace")
                            and (await self._http.get("/api/version")).status_code == 200):
                        return
                if time.monotonic() > deadline:
                    raise RayError(f"the Ray head's dashboard did not answer within {self.start_timeout:g} s; "
                                   f"see {self.work_dir / 'head.log'}")
                await asyncio.sleep(0.1)
        except BaseException:
            await self.stop()
            raise

    async def _watch(self) -> None:
        await self.process.wait()
        self.exited.set()

    def exit_reason(self) -> str:
        """Why the head is gone, in Ray's own last words."""
        try:
            lines = [line.strip() for line in (self.work_dir / "head.log").read_text(errors="replace").splitlines()
                     if line.strip() and not line.startswith(" ")]
        except OSError:
            lines = []
        return (f"the Ray head exited with status {self.process.returncode}: "
                + (" | ".join(lines[-2:]) if lines else "it printed nothing") + f" (see {self.work_dir / 'head.log'})")

    async def nodes(self) -> list[dict[str, Any]]:
        """Live and dead Ray nodes with their labels, from the dashboard's state API."""
        response = await self._http.get("/api/v0/nodes", params={"limit": 10000, "detail": "true"})
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    async def stop(self, grace: float = 10.0) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.process is not None and self.process.returncode is None:
            await terminate(self.process, grace, polite=signal_leader(self.process))
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
