"""`Pool`: FLAME's verbs for a notebook. Run a function on a pool node as if it were a local call.

    pool = Pool(min=0, max=64, gpus_per_node=1, idle_shutdown_after=60)
    loss = pool.call(train, config)            # boots a node if none is free and `max` allows
    losses = pool.map(train, configs)          # spread over up to `max` nodes
    future = pool.submit(train, config)        # a concurrent.futures.Future

A call takes a ready node with a free slot (at most `max_concurrency` calls a node), else boots one when
the pool is below `max`, else waits for a slot. Booting retries once on other GPUs (the engine's rule);
a node that cannot boot fails the call with the reason. Nodes idle for `idle_shutdown_after` seconds
are stopped down to `min`. The function runs as a Ray task pinned to the node by its label; its result
comes back, and its exception is raised here as its own type (Ray's `as_instanceof_cause`).

Each call runs in the notebook's current code (codesync.py): modules edited next to the notebook are seen by
the next call, and the function itself is unpickled on its node only once that version is in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from provisioner import loop
from provisioner.codesync import CodeTree
from provisioner.run import ClusterRun, default_work_dir
from provisioner.engine import NODE_LABEL
from provisioner.errors import BootError, SpecError
from provisioner.spec import cluster_spec, default_backend
from provisioner.hosts import load_inventory


class Pool:
    def __init__(self, min: int = 0, max: int = 64, gpus_per_node: int = 0, *,  # noqa: A002 (FLAME's names)
                 idle_shutdown_after: float = 60.0, boot_timeout: float = 300.0, max_concurrency: int = 1,
                 backend: str | None = None, hosts: str | Path | None = None, image: str | Path | None = None,
                 gpu_type: str | None = None, cpus: int = 1, memory_gib: int = 4, name: str = "",
                 sync_code: bool = True, pack_env: bool = True) -> None:
        if not 0 <= min <= max:
            raise SpecError(f"Pool needs 0 <= min <= max (got min={min}, max={max})")
        if max_concurrency < 1:
            raise SpecError("max_concurrency is at least 1 call per node")
        spec = cluster_spec(nodes=min, gpus_per_node=gpus_per_node, gpu_type=gpu_type, cpus=cpus, memory_gib=memory_gib,
                            backend=default_backend(backend, hosts), image=image,
                            boot_timeout=boot_timeout, name=name, pack_env=pack_env)
        self._code = CodeTree() if sync_code else None
        if self._code is not None:
            self._code.snapshot()  # too big a directory is refused now, before anything starts
        self.min, self.max, self.max_concurrency = min, max, max_concurrency
        self.idle_shutdown_after = idle_shutdown_after
        self._gpus = gpus_per_node
        self._run = ClusterRun(spec, default_work_dir(spec.name),
                               inventory=load_inventory(Path(hosts)) if hosts else None)
        self._busy: dict[str, int] = {}
        self._idle_since: dict[str, float] = {}
        self._growing = 0
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task | None = None
        self._started = loop.submit(self._start())

    # -- the verbs ---------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return loop.submit(self._call(fn, args, kwargs))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        version = loop.run(self._version())  # one look at the code for the whole map
        futures = [loop.submit(self._call(fn, (item,), {}, version)) for item in items]
        return [f.result() for f in futures]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self._run.summary()["nodes"]

    def close(self) -> None:
        if self._run.head is not None:
            self._run.head.disconnect()
        loop.run(self._close())

    def __enter__(self) -> Pool:
        self._started.result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ready = sum(n["state"] == "ready" for n in self.nodes)
        return f"<hearth.Pool min={self.min} max={self.max}: {ready} nodes ready, {sum(self._busy.values())} calls running>"

    # -- on the loop ---------------------------------------------------------------------------------
    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        await self._run.up()
        await asyncio.to_thread(self._run.head.connect, self._code)
        for node in self._run.engine.nodes:
            self._busy[node], self._idle_since[node] = 0, time.monotonic()
        self._reaper = asyncio.create_task(self._reap())

    async def _version(self) -> str | None:
        """The code version calls run in now: published to the cluster if it changed (codesync.py)."""
        await asyncio.wrap_future(self._started)
        if self._code is None:
            return None
        return await asyncio.to_thread(self._code.publish, self._run.head.address)

    async def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, version: str | None = None) -> Any:
        import ray.cloudpickle
        from ray.exceptions import RayTaskError

        version = version or await self._version()
        node = await self._checkout()
        try:
            task = _call_remote().options(label_selector={NODE_LABEL: node}, num_cpus=1, num_gpus=self._gpus)
            return await asyncio.wrap_future(task.remote(version, ray.cloudpickle.dumps(fn), *args, **kwargs).future())
        except RayTaskError as error:
            raise error.as_instanceof_cause() from None
        finally:
            async with self._changed:
                self._busy[node] -= 1
                if not self._busy[node]:
                    self._idle_since[node] = time.monotonic()
                self._changed.notify_all()

    async def _checkout(self) -> str:
        """A ready node with a free slot: one that is free, a new one if allowed, or the next freed."""
        async with self._changed:
            while True:
                free = [n for n, busy in self._busy.items() if busy < self.max_concurrency]
                if free:
                    node = min(free, key=lambda n: self._busy[n])
                    self._busy[node] += 1
                    return node
                if len(self._busy) + self._growing < self.max:
                    break
                await self._changed.wait()
            self._growing += 1
        try:
            (record,) = await self._run.engine.add(1)
        finally:
            async with self._changed:
                self._growing -= 1
        if not record.ready:
            await self._run.engine.remove([record.node_id])
            raise BootError(f"the pool could not boot a node: {'; then '.join(record.errors)}")
        async with self._changed:
            self._busy[record.node_id] = 1
            self._changed.notify_all()
        return record.node_id

    async def _reap(self) -> None:
        """Stop nodes idle for idle_shutdown_after, keeping `min` of them."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_shutdown_after / 4))
            async with self._changed:
                idle = [n for n, busy in self._busy.items()
                        if not busy and time.monotonic() - self._idle_since[n] >= self.idle_shutdown_after]
                idle = idle[:max(len(self._busy) - self.min, 0)]
                for node in idle:
                    del self._busy[node], self._idle_since[node]
            if idle:
                await self._run.engine.remove(idle)

    async def _close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if not self._started.done():
            self._started.cancel()
        await self._run.down()


_remote = None


def _call_remote():
    """codesync.call as a Ray remote function, made once per process (Ray exports it once)."""
    global _remote
    if _remote is None:
        import ray

        from provisioner import codesync

        _remote = ray.remote(codesync.call)
    return _remote
