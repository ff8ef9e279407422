"""One cluster's life, asynchronously: its Ray head, its backend and its boot engine, and a summary of it.

The notebook `Cluster` and the `hearth up` supervisor are thin fronts over `ClusterRun`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from provisioner import envimage, userdirs
from provisioner.backends import Backend
from provisioner.backends.cloud_hypervisor import CloudHypervisorBackend, StandinSettings
from provisioner.backends.local import LocalBackend
from provisioner.backends.qemu import QemuBackend
from provisioner.engine import Engine, NodeRecord
from provisioner.errors import HearthError, SpecError
from provisioner.events import NodeState, OnEvent
from provisioner.node import EnvImage
from provisioner.ray_head import RayHead
from provisioner.spec import ClusterSpec
from provisioner.hosts import Host, Inventory


MAX_WORK_DIR = userdirs.MAX_RUN_DIR  # Ray's Unix sockets under it must fit in 107 bytes


class ClusterRun:
    def __init__(self, spec: ClusterSpec, work_dir: Path, *, inventory: Inventory | None = None,
                 on_event: OnEvent | None = None, standin: StandinSettings | None = None,
                 with_ray: bool = True, lease_s: float = 30.0) -> None:
        """`with_ray=False` boots nodes without a Ray head, ready when the guest says it joined: only for
        stand-in VMMs whose guests run no Ray (benchmarks of the control plane)."""
        self.spec = spec
        self.work_dir = work_dir
        self.on_event = on_event
        if len(str(work_dir)) > MAX_WORK_DIR:
            raise SpecError(f"run directory {work_dir} is longer than {MAX_WORK_DIR} characters: Ray's Unix sockets "
                            "under it would pass the 107-byte limit. Set HEARTH_RUN_DIR to a shorter path")
        self.head = RayHead(work_dir, host=inventory.head_host if inventory else "127.0.0.1") if with_ray else None
        hosts = inventory.hosts if inventory else [Host(name="local")]
        self.backend: Backend
        if spec.backend == "local":
            self.backend = LocalBackend(work_dir / "n")
        elif spec.backend == "qemu":
            self.backend = QemuBackend(hosts, work_dir / "vms", inventory.head_host if inventory else "127.0.0.1")
        else:
            self.backend = CloudHypervisorBackend(hosts, work_dir, cluster=spec.name, image=spec.image,
                                                  standin=standin, lease_s=lease_s)
        self.engine = Engine(spec, self.backend, head=self.head, hosts=[h.name for h in hosts],
                             on_event=on_event, verify_ray=with_ray,
                             host_limits={h.name: h.max_concurrent_boots for h in hosts if h.max_concurrent_boots})
        self.status = "new"
        self.error: str | None = None
        # Elapsed time counts from here (when `Cluster(...)` ran), not from the first node's boot: the Ray head's
        # start comes first and takes seconds, and users see it as a phase of its own.
        self.created_at = time.time()
        self.ended_at: float | None = None
        self.head_phases: dict[str, float] = {}  # when the head reached "starting", "up", "failed", "stopped"
        self.env: dict[str, Any] | None = None  # the environment image the VMs run from, and where it went
        self._scaling = asyncio.Lock()
        self._adaptive: asyncio.Task | None = None

    async def up(self) -> list[NodeRecord]:
        self.status = "booting"
        userdirs.ensure(self.work_dir, "run directory")  # this user's alone, or refused before anything starts
        try:
            self.engine.offer(await self.backend.open())
            self.engine.plan()  # short capacity fails here, before the head or any node starts
            # The head starts while the environment image is packed (or found packed) and carried to the hosts.
            await first_error(self._start_head(), self._carry_env())
            ready = await self.engine.up()
        except BaseException as error:
            cancelled = isinstance(error, asyncio.CancelledError)
            self.status, self.error = "failed", "cancelled" if cancelled else str(error) or type(error).__name__
            if "starting" in self.head_phases and "up" not in self.head_phases:
                self.head_phases["failed"] = time.time()
            await self.down(keep_status=True)
            raise
        self.status = "ready"
        return ready

    async def _start_head(self) -> None:
        if self.head is not None:
            self.head_phases["starting"] = time.time()
            await self.head.start()
            self.head_phases["up"] = time.time()

    async def _carry_env(self) -> None:
        """VM nodes run the notebook's work in the controller's own environment: pack it (a cache hit when
        nothing was installed since), refusing before any VM starts when the nodes could not run it, and put it
        on every host. Local nodes share this machine's environment as it is."""
        if self.spec.backend == "local" or not self.spec.pack_env:
            return
        guest = self.spec.image if self.spec.image and (self.spec.image / "manifest.json").is_file() else None
        packed = await asyncio.to_thread(envimage.pack, image=guest)
        image = packed.image
        self.env = {"key": image.key, "sha256": image.sha256, "size": image.size,
                    "interpreter": image.meta["interpreter"], "cached": packed.cached,
                    "pack_s": round(packed.seconds, 2), "hosts": {}}
        self.env["hosts"] = await self.backend.carry(image)
        self.engine.env_image = EnvImage(sha256=image.sha256, key=image.key, interpreter=image.meta["interpreter"],
                                         size=image.size)

    async def scale(self, nodes: int) -> None:
        """Grow or shrink to `nodes` nodes (the newest go first). Calls are serialised, so the last wins."""
        async with self._scaling:
            live = [r for r in self.engine.nodes.values() if r.history.state not in (NodeState.stopping, NodeState.stopped)]
            if nodes > len(live):
                await self.engine.add(nodes - len(live))
            elif nodes < len(live):
                newest_first = sorted(live, key=lambda r: (r.ready, -int(r.node_id.rsplit("-", 1)[1])))
                await self.engine.remove([r.node_id for r in newest_first[:len(live) - nodes]])

    def adapt(self, minimum: int, maximum: int, idle_shutdown_after: float = 60.0, interval: float = 2.0) -> None:
        """Keep between `minimum` and `maximum` nodes: add nodes while Ray has work waiting for resources, stop
        nodes idle for `idle_shutdown_after` seconds (to zero when `minimum` is 0). Replaces an earlier adapt."""
        if self._adaptive is not None:
            self._adaptive.cancel()
        self._adaptive = asyncio.get_running_loop().create_task(
            self._adapt(minimum, maximum, idle_shutdown_after, interval))

    async def _adapt(self, minimum: int, maximum: int, idle_after: float, interval: float) -> None:
        from ray.autoscaler.v2.sdk import get_cluster_status

        while True:
            live = [r for r in self.engine.nodes.values() if r.history.state not in (NodeState.stopping, NodeState.stopped)]
            try:
                status = await asyncio.to_thread(get_cluster_status, self.head.address)
            except Exception:  # the head is busy or restarting: decide next time
                await asyncio.sleep(interval)
                continue
            waiting = sum(b.count for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count)
            idle = [n.labels.get("hearth.io/node") for n in status.idle_nodes
                    if n.labels and n.resource_usage and n.resource_usage.idle_time_ms >= idle_after * 1000]
            if len(live) < minimum or (waiting and len(live) < maximum):
                await self.scale(min(maximum, max(minimum, len(live) + waiting)))
            elif idle and len(live) > minimum:
                victims = [n for n in idle if n in self.engine.nodes][:len(live) - minimum]
                async with self._scaling:
                    await self.engine.remove(victims)
            await asyncio.sleep(interval)

    async def down(self, keep_status: bool = False) -> None:
        if self._adaptive is not None:
            self._adaptive.cancel()
        await self.engine.down()
        await self.backend.close()
        if self.head is not None:
            await self.head.stop()
            if self.head_phases:
                self.head_phases.setdefault("stopped", time.time())
        shutil.rmtree(self.work_dir / "n", ignore_errors=True)
        self.ended_at = self.ended_at or time.time()
        if not keep_status:
            self.status = "stopped"

    def submit_job(self, entrypoint: str, runtime_env: dict[str, Any] | None = None, **options: Any) -> str:
        """Submit a Ray job (Ray's JobSubmissionClient, with this cluster's token); returns its id."""
        return self.job_client().submit_job(entrypoint=entrypoint, runtime_env=runtime_env, **options)

    def job_client(self):
        from provisioner.jobs import job_client

        if self.head is None or self.status != "ready":
            raise HearthError(f"cluster {self.spec.name} is {self.status}: jobs need a ready cluster with Ray")
        return job_client(self.head.dashboard_url, self.head.token)

    def summary(self) -> dict[str, Any]:
        """What `hearth status`, the notebook's view and the status page show (JSON-able; no secrets)."""
        engine = self.engine
        return {
            "name": self.spec.name, "backend": self.spec.backend, "status": self.status, "error": self.error,
            "pid": os.getpid(), "nodes_asked": self.spec.nodes, "min_nodes": self.spec.required_nodes,
            "created_at": self.created_at, "started_at": engine.started_at, "ready_at": engine.ready_at,
            "ended_at": self.ended_at, "head": dict(self.head_phases) if self.head else None, "env": self.env,
            "ray": {"address": self.head.address, "dashboard": self.head.dashboard_url} if self.head else None,
            "nodes": [_node_summary(r) for r in engine.nodes.values()],
        }


def _node_summary(record: NodeRecord) -> dict[str, Any]:
    history = record.history
    last = history.events[-1] if history.events else None
    return {
        "id": record.node_id, "host": record.placement.host if record.placement else None,
        "gpus": [g.address for g in record.placement.gpus] if record.placement else [],
        "state": last.state.value if last else "new", "detail": last.detail if last else None,
        "since": last.at if last else None, "ray_node_id": record.ray_node_id, "attempts": len(record.attempts),
        "errors": record.errors, "profile": history.profile(),
        "guest_profile": dict(record.process.guest_profile) if record.process else {},
        "events": [{"state": e.state.value, "at": e.at, "detail": e.detail} for e in history.events],
    }


def default_work_dir(name: str) -> Path:
    """The cluster's run directory under this user's run root (userdirs.py: per user, 0700, checked; short,
    because Unix socket paths under it must fit in 107 bytes). The root is made and checked now; the cluster's
    own directory when it starts."""
    return userdirs.run_dir(name)


async def first_error(*steps) -> None:
    """Run `steps` at once; the first to fail cancels the others and is raised as it is (not as a group)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
