"""The parallel boot engine: N nodes at once, so a cluster is ready after about its slowest node.

    place every node (pure; short capacity fails here, before anything starts); with min_nodes, the nodes
      that fit are placed (at least min_nodes) and the others fail at once, saying why they were not placed
    boot all nodes concurrently, each within boot_timeout, a host's boots capped where it asks
      a node that fails or times out is stopped, and retried once on other GPUs; when it failed because
      another controller took its GPU since the hosts were asked (409), the hosts are asked again first
    a node is ready when the Ray head shows a live node carrying its label
    ready >= min_nodes: the cluster is up (the failures are reported)
    otherwise, or on cancel (Ctrl-C, close()): everything started is torn down

Every node's states are timestamped (see events.py); their durations are its boot profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field

import httpx

from provisioner.backends import Backend, NodeProcess, checked
from provisioner.errors import AgentRefused, BootError, HearthError, NodeEnded, PlacementError, RayError
from provisioner.events import ENDING, TERMINAL, NodeHistory, NodeState, OnEvent
from provisioner.node import EnvImage, GpuRequest, NodeSpec, RayJoin
from provisioner.placement import GpuSlot, NodePlacement, place, place_what_fits
from provisioner.ray_head import RayHead
from provisioner.spec import ClusterSpec

NODE_LABEL = "hearth.io/node"
HOST_MARGIN_S = 5.0
ATTEMPT_LABEL = "hearth.io/attempt"  # a retried node's first Ray node may linger ALIVE for a while


@dataclass
class NodeRecord:
    node_id: str
    placement: NodePlacement | None  # None: not placed (min_nodes let the cluster boot without it)
    attempts: list[NodeHistory] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    process: NodeProcess | None = None
    ray_node_id: str | None = None
    slot_wait_s: float = 0.0  # time spent waiting for a boot slot on its host (max_concurrent_boots)

    @property
    def history(self) -> NodeHistory:
        return self.attempts[-1]

    @property
    def ready(self) -> bool:
        return self.history.state == NodeState.ready


class Engine:
    def __init__(self, spec: ClusterSpec, backend: Backend, *, head: RayHead | None, hosts: list[str],
                 on_event: OnEvent | None = None,
                 host_limits: dict[str, int] | None = None, verify_ray: bool = True) -> None:
        self.spec = spec
        self.backend = backend
        self.head = head
        self.hosts = hosts
        self.on_event = on_event
        self.verify_ray = verify_ray and head is not None
        self.nodes: dict[str, NodeRecord] = {}
        self.control_cpu_s = 0.0  # this process's CPU time spent booting: the control plane's cost
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._pool: list[GpuSlot] = []
        self._avoid: set[tuple[str, str]] = set()  # GPUs a boot failed on (not for a 409): not used again this run
        self._limits = {h: asyncio.Semaphore(n) for h, n in (host_limits or {}).items()}
        self._seen: dict[tuple[str, str], asyncio.Future] = {}
        self._poller: asyncio.Task | None = None
        self._next_index = 0
        self.env_image: EnvImage | None = None  # set once it is on the hosts (run.py): every VM node runs from it

    def offer(self, free_gpus: list[GpuSlot]) -> None:
        """The GPUs the hosts have free now (the backend asked them), for placement."""
        self._pool = list(free_gpus)

    def plan(self) -> None:
        """Place every node, or raise `PlacementError` (what is free where) before anything starts. With
        min_nodes, the nodes that fit are placed, if at least min_nodes do; the others fail now, saying why."""
        if not self.nodes:
            self._records(self.spec.node_ids(), at_least=self.spec.required_nodes)

    def _records(self, node_ids: list[str], at_least: int | None = None) -> list[NodeRecord]:
        """Records for `node_ids`, placed on the pool's GPUs: all of them, or (`at_least`) as many as fit."""
        placements, short = place_what_fits(node_ids, self._gpus_per_node, self.hosts, self._pool)
        if short is not None and len(placements) < (at_least or len(node_ids)):
            if at_least is not None and at_least < len(node_ids):
                short = (f"only {len(placements)} of {len(node_ids)} nodes fit, fewer than min_nodes {at_least}: "
                         f"{short}")
            raise PlacementError(short)
        taken = {(g.host, g.address) for p in placements for g in p.gpus}
        self._pool = [g for g in self._pool if (g.host, g.address) not in taken]
        records = [NodeRecord(p.node_id, p, attempts=[NodeHistory(p.node_id)]) for p in placements]
        for node_id in node_ids[len(placements):]:
            records.append(self._unplaced(node_id, f"not placed: {short}"))
        self.nodes.update({r.node_id: r for r in records})
        self._next_index = max([self._next_index, *(int(n.rsplit("-", 1)[1]) + 1 for n in node_ids)])
        return records

    def _unplaced(self, node_id: str, reason: str) -> NodeRecord:
        """A node that got no GPUs: failed and over, with the reason, before anything of it started."""
        history = NodeHistory(node_id)
        record = NodeRecord(node_id, None, attempts=[history], errors=[reason])
        for state, detail in ((NodeState.requested, None), (NodeState.failed, reason), (NodeState.stopped, None)):
            event = history.transition(state, detail)
            if self.on_event is not None:
                self.on_event(event)
        return record

    @property
    def _gpus_per_node(self) -> int:
        """Physical GPUs to place per node; the local backend's are Ray's fake ones."""
        return self.spec.gpus_per_node if self.backend.physical_gpus else 0

    async def up(self) -> list[NodeRecord]:
        """Boot every node; returns the ready ones, or raises `BootError` with nothing left running."""
        self.plan()
        self.started_at, cpu = time.time(), time.process_time()
        try:
            await self._boot_all([r for r in self.nodes.values() if r.placement is not None])
        except BaseException:
            await self.down()
            raise
        finally:
            self.control_cpu_s = time.process_time() - cpu
        ready = [r for r in self.nodes.values() if r.ready]
        if len(ready) < self.spec.required_nodes:
            failed = [r for r in self.nodes.values() if not r.ready]
            await self.down()
            raise BootError(
                f"only {len(ready)} of {self.spec.nodes} nodes became ready (min_nodes {self.spec.required_nodes}); "
                "everything was torn down. Failed:\n"
                + "\n".join(f"  - {r.node_id}: {'; then '.join(r.errors)}" for r in failed))
        self.ready_at = time.time()
        return ready

    async def add(self, count: int) -> list[NodeRecord]:
        """Boot `count` more nodes (scale up); returns their records, ready or failed."""
        records = self._records([f"{self.spec.name}-{self._next_index + i}" for i in range(count)])
        try:
            await self._boot_all(records)
        except BaseException:
            await self.remove([r.node_id for r in records])
            raise
        return records

    async def remove(self, node_ids: list[str], grace: float = 5.0) -> None:
        """Stop these nodes (scale down) and give their GPUs back to the pool."""
        records = [self.nodes.pop(n) for n in node_ids if n in self.nodes]
        await asyncio.gather(*(r.process.stop(grace) for r in records if r.process is not None),
                             return_exceptions=True)
        self._pool += [g for r in records if r.placement is not None for g in r.placement.gpus]

    async def down(self, grace: float = 5.0) -> None:
        """Stop every node this engine started. Idempotent."""
        await asyncio.gather(*(r.process.stop(grace) for r in self.nodes.values() if r.process is not None),
                             return_exceptions=True)

    async def _boot_all(self, records: list[NodeRecord]) -> None:
        await asyncio.gather(*(self._boot(record) for record in records))

    async def _boot(self, record: NodeRecord) -> None:
        placement = record.placement
        for attempt in (1, 2):
            if attempt > 1:
                record.attempts.append(NodeHistory(record.node_id))
            history = record.history
            record.placement = placement
            spec = self.node_spec(placement, attempt)
            process = record.process = checked(self.backend, self.backend.node(spec, history, self.on_event))
            process.tracker.transition(NodeState.requested, None if attempt == 1 else f"retry: {record.errors[-1]}")
            process.tracker.transition(NodeState.placed, _where(placement))
            deadline = time.monotonic() + self.spec.boot_timeout
            try:
                asked = time.monotonic()
                async with self._limits.get(placement.host) or contextlib.nullcontext():
                    record.slot_wait_s += time.monotonic() - asked
                    # The backend bounds its own waits by the deadline (on a host too); the margin lets a
                    # host's own timeout, with its words, arrive before ours.
                    await asyncio.wait_for(process.start(deadline), _left(deadline) + HOST_MARGIN_S)
                await self._unless_head_dies(process.wait_for(NodeState.ray_joined, _left(deadline)))
                if self.verify_ray:
                    seen = self._seen_future((record.node_id, str(attempt)))
                    if self._poller is None or self._poller.done():
                        self._poller = asyncio.create_task(self._poll())
                    record.ray_node_id = await self._unless_head_dies(asyncio.wait_for(seen, _left(deadline)))
                process.tracker.transition(NodeState.ready, f"Ray node {record.ray_node_id}" if record.ray_node_id else None)
                return
            except (HearthError, asyncio.TimeoutError, OSError) as error:
                # A node that failed while we waited: its own account (the guest's words, the VMM's last log lines)
                reason = (error.reason if isinstance(error, NodeEnded) and error.reason
                          else _reason(error, self.spec.boot_timeout))
                record.errors.append(reason)
                if history.state not in TERMINAL:
                    process.tracker.transition(NodeState.failed, reason)
                await process.stop(0)
                conflict = isinstance(error, AgentRefused) and error.status == 409
                if not conflict:
                    self._avoid |= {(g.host, g.address) for g in placement.gpus}
            if attempt == 1:
                if conflict:  # another controller took the GPU since the hosts were asked: what is free now?
                    await self._refresh()
                try:
                    placement = self._replace(placement)
                except PlacementError as error:
                    record.errors.append(f"no retry: {error}")
                    return

    async def _unless_head_dies(self, waiting):
        """`waiting`, unless the Ray head exits first (`RayError` in its own words): nobody can join then."""
        if self.head is None:
            return await waiting
        wait, gone = asyncio.ensure_future(waiting), asyncio.ensure_future(self.head.exited.wait())
        try:
            await asyncio.wait({wait, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (wait, gone):
                task.cancel()
            await asyncio.gather(wait, gone, return_exceptions=True)
        if not wait.cancelled():
            return wait.result()
        raise RayError(self.head.exit_reason())

    def node_spec(self, placement: NodePlacement, attempt: int) -> NodeSpec:
        """The one request a backend (and a host agent) gets for this boot attempt of this node."""
        spec = self.spec
        labels = {NODE_LABEL: placement.node_id, ATTEMPT_LABEL: str(attempt), "hearth.io/cluster": spec.name,
                  "hearth.io/gpu-type": spec.gpu_type or ("none" if not spec.gpus_per_node else "unknown"),
                  **spec.labels}
        ray = RayJoin(address=self.head.address if self.head else "", token=self.head.token if self.head else "",
                      labels=labels, num_cpus=spec.cpus, num_gpus=spec.gpus_per_node)
        return NodeSpec(id=placement.node_id, uid=secrets.token_hex(8), host=placement.host, cpus=spec.cpus,
                        memory_mib=spec.memory_gib * 1024, image=spec.image, ray=ray, env=spec.env,
                        env_image=self.env_image,
                        gpus=[GpuRequest(address=g.address, clique=g.clique) for g in placement.gpus])

    async def _refresh(self) -> None:
        """Ask the hosts again which GPUs are free (after a 409, what they said at the start is out of date), less
        those this run's other nodes hold or are booting on and those a boot failed on."""
        try:
            free = await self.backend.free()
        except HearthError:  # a host does not answer now: place from what is known, and let the agent judge
            return
        mine = {(g.host, g.address) for r in self.nodes.values()
                if r.placement is not None and r.history.state not in ENDING for g in r.placement.gpus}
        self._pool = [g for g in free if (g.host, g.address) not in mine | self._avoid]

    def _replace(self, failed: NodePlacement) -> NodePlacement:
        """Other GPUs for a node whose boot failed; its GPUs are not used again in this run."""
        (placement,) = place([failed.node_id], self._gpus_per_node, self.hosts, self._pool)
        taken = {g.address for g in placement.gpus}
        self._pool = [g for g in self._pool if not (g.host == placement.host and g.address in taken)]
        return placement

    def _seen_future(self, key: tuple[str, str]) -> asyncio.Future:
        if key not in self._seen:
            self._seen[key] = asyncio.get_running_loop().create_future()
        return self._seen[key]

    async def _poll(self) -> None:
        """One poller for all nodes: the head's live nodes, matched to ours by label, while any node waits."""
        while any(not f.done() for f in self._seen.values()):
            try:
                nodes = await self.head.nodes()
            except (httpx.HTTPError, KeyError, ValueError):
                nodes = []
            for node in nodes:
                labels = node.get("labels") or {}
                future = self._seen.get((labels.get(NODE_LABEL), labels.get(ATTEMPT_LABEL)))
                if node.get("state") == "ALIVE" and future is not None and not future.done():
                    future.set_result(node["node_id"])
            await asyncio.sleep(0.25)


def _where(placement: NodePlacement) -> str:
    gpus = ", ".join(g.address for g in placement.gpus)
    return f"{placement.host}" + (f": {gpus}" if gpus else "")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"not ready within boot_timeout ({timeout:g} s)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
