"""`Pool`: FLAME's verbs for a notebook. Run a function on a pool node as if it were a local call.

    pool = Pool(min=0, max=64, gpus_per_node=1, idle_shutdown_after=60)
    loss = pool.call(train, config)                    # boots a node if none is free and `max` allows
    loss = pool.call(train, config, timeout=600)       # CallTimeout after 600 s; the call's task is cancelled
    loss = pool.call(train, config, idempotent=True)   # run once more on another node if its node dies
    losses = pool.map(train, configs, timeout=3600)    # spread over up to `max` nodes; one deadline for all
    future = pool.submit(train, config)                # a concurrent.futures.Future

A call takes a ready node with a free slot (at most `max_concurrency` calls a node), else boots one when
the pool is below `max`, else waits for a slot. Booting retries once on other GPUs (the engine's rule);
a node that cannot boot fails the call with the reason. Nodes idle for `idle_shutdown_after` seconds
are stopped down to `min`. The function runs as a Ray task pinned to the node by its label; its result
comes back, and its exception is raised here as its own type (Ray's `as_instanceof_cause`).

Nothing waits on a dead node. A call's node can die under it (its `ray start` or VM ends, its host agent loses
it, or Ray declares its raylet dead); Ray would then keep the task, pinned to a node that is gone, pending
forever. Instead the call raises `NodeLost` in the caller with the node's own reason, as FLAME raises in the
caller when a runner dies; the node leaves the pool at once (no later call goes there) and is stopped, and a
replacement boots while the pool is below `min` (later calls boot one up to `max`, as always). The task is
sent with no Ray-side retries, so Ray never re-queues it for the dead node.

`idempotent=True` runs a call whose node died once more, on another node (a fresh one when none is free).
It is the caller's to say, per call: only the caller knows whether running the function twice is harmless (it
may have written half its output before the node died), so hearth never retries on its own. A call that
raises, or times out, is never retried.

`timeout` (seconds) bounds the whole call, booting a node for it included (a node booted for a call that
times out is stopped with it); for `map` it is one deadline for every item, counted from the call to `map`.
When it passes, the call's Ray task is cancelled (its worker ended) and `CallTimeout` is raised. `map` raises
the first failure and cancels the calls still running. `timeout` and `idempotent` are the pool's keywords;
a function that takes arguments with those names gets them through `functools.partial`.

Each call runs in the notebook's current code (codesync.py): modules edited next to the notebook are seen by
the next call, and the function itself is unpickled on its node only once that version is in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from provisioner import loop
from provisioner.codesync import CodeTree
from provisioner.engine import NODE_LABEL
from provisioner.errors import BootError, CallTimeout, HearthError, NodeLost, SpecError
from provisioner.events import TERMINAL, NodeEvent
from provisioner.hosts import load_inventory
from provisioner.run import ClusterRun, default_work_dir
from provisioner.spec import cluster_spec, default_backend

SETTLE_S = 5.0  # after a Ray error that a dying node also causes: how long to wait for the node's own account
CANCEL_S = 10.0  # how long a cancelled call's slot waits for its task to end before it is given out again
TEND_S = 1.0  # how often idle nodes are looked for and, while calls run, Ray's view of the nodes is checked


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
        self.lost: list[dict[str, Any]] = []  # the nodes that died under the pool: {"node", "reason", "at"}
        self._gpus = gpus_per_node
        self._run = ClusterRun(spec, default_work_dir(spec.name),
                               inventory=load_inventory(Path(hosts)) if hosts else None, on_event=self._on_event)
        self._busy: dict[str, int] = {}  # the pool's nodes (ready, not lost) and the calls each is running
        self._idle_since: dict[str, float] = {}
        self._deaths: dict[str, asyncio.Future[str]] = {}  # per node: resolved with the reason when it dies
        self._growing = 0
        self._closing = False
        self._changed: asyncio.Condition | None = None
        self._tender: asyncio.Task | None = None
        self._ending: set[asyncio.Task] = set()  # cancelled calls whose tasks are being ended (_end_task)
        self._started = loop.submit(self._start())

    # -- the verbs ---------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, idempotent: bool = False,
             **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on a pool node. Ctrl-C cancels it (and its task)."""
        _check_timeout(timeout)
        return loop.run(self._call(fn, args, kwargs, timeout=timeout, idempotent=idempotent))

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, idempotent: bool = False,
               **kwargs: Any) -> concurrent.futures.Future:
        _check_timeout(timeout)
        return loop.submit(self._call(fn, args, kwargs, timeout=timeout, idempotent=idempotent))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, timeout: float | None = None,
            idempotent: bool = False) -> list[Any]:
        """`[fn(item) for item in items]`, spread over the pool; `timeout` is one deadline for all of them."""
        _check_timeout(timeout)
        return loop.run(self._map(fn, list(items), timeout, idempotent))

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
            self._join(node)
        self._tender = asyncio.create_task(self._tend())

    async def _version(self) -> str | None:
        """The code version calls run in now: published to the cluster if it changed (codesync.py)."""
        await asyncio.wrap_future(self._started)
        if self._code is None:
            return None
        return await asyncio.to_thread(self._code.publish, self._run.head.address)

    async def _map(self, fn: Callable[[Any], Any], items: list[Any], timeout: float | None, idempotent: bool) -> list[Any]:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        version = await self._version()  # one look at the code for the whole map
        calls = [asyncio.ensure_future(self._call(fn, (item,), {}, deadline=deadline, idempotent=idempotent,
                                                  version=version, within=timeout)) for item in items]
        try:
            return await asyncio.gather(*calls)
        finally:  # after the first failure, the calls still running are cancelled (and their tasks)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, *, timeout: float | None = None,
                    idempotent: bool = False, version: str | None = None, deadline: float | None = None,
                    within: float | None = None) -> Any:
        if deadline is None and timeout is not None:
            deadline = asyncio.get_running_loop().time() + timeout
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                version = version or await self._version()
                try:
                    return await self._call_once(fn, args, kwargs, version)
                except NodeLost:
                    if not idempotent:
                        raise
                return await self._call_once(fn, args, kwargs, version)  # idempotent: once more, elsewhere
        except TimeoutError:
            if not limit.expired():
                raise  # the function's own TimeoutError
            raise CallTimeout(f"the call to {_name(fn)} did not finish within {within or timeout:g} s; its Ray task "
                              "was cancelled (pass a larger timeout=, or None for no limit)") from None

    async def _call_once(self, fn: Callable[..., Any], args: tuple, kwargs: dict, version: str | None) -> Any:
        import ray.cloudpickle
        from ray.exceptions import RayError, RayTaskError

        pickled = ray.cloudpickle.dumps(fn)  # a function that cannot travel fails here, before a node is taken
        node = await self._checkout()
        death = self._deaths[node]
        result: asyncio.Future | None = None
        ref = None
        try:
            task = _call_remote().options(label_selector={NODE_LABEL: node}, num_cpus=1, num_gpus=self._gpus,
                                          max_retries=0)  # never re-queued by Ray for a node that is gone
            ref = task.remote(version, pickled, *args, **kwargs)
            result = asyncio.wrap_future(ref.future())
            await asyncio.wait({result, death}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                raise self._lost(node, death.result(), fn)
            try:
                return result.result()
            except RayTaskError as error:  # the function raised: its own exception, as if it ran here
                raise error.as_instanceof_cause() from None
            except RayError as error:  # its worker or its node went away: the node's own account, if it died
                reason = await self._death_of(node, death)
                if reason is None:
                    raise
                raise self._lost(node, reason, fn) from error
        finally:
            if result is not None and not result.done():  # timed out, cancelled, or its node died: end the task
                result.cancel()
                ending = asyncio.get_running_loop().create_task(self._end_task(ref, node))
                self._ending.add(ending)  # held: the loop keeps only a weak reference to a task
                ending.add_done_callback(self._ending.discard)
            else:
                await self._release(node)

    async def _end_task(self, ref: Any, node: str) -> None:
        """Cancel a call's Ray task, and free its node's slot once the task has ended (its worker is killed):
        until then Ray still holds the node's CPU for it, and a call given the slot would queue behind a dying
        worker. At most CANCEL_S: a node that cannot say so in time is not waited for."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, _cancel, ref)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(ref.future()), CANCEL_S)
        finally:
            await self._release(node)

    def _lost(self, node: str, reason: str, fn: Callable[..., Any]) -> NodeLost:
        return NodeLost(f"node {node} died during the call to {_name(fn)}: {reason}. The node has left the pool; "
                        "the call was not run again (pass idempotent=True for calls that may run twice)", node, reason)

    async def _death_of(self, node: str, death: asyncio.Future[str]) -> str | None:
        """Why `node` died, if it did: a Ray error (a worker crashed, a node died) may come before the node's own
        account arrives, or be the function's own doing (a worker that called os._exit) on a live node."""
        if not death.done():
            await self._check_ray()
        try:
            return await asyncio.wait_for(asyncio.shield(death), SETTLE_S)
        except asyncio.TimeoutError:
            return None

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
            self._join(record.node_id, busy=1)
            self._changed.notify_all()
        return record.node_id

    async def _release(self, node: str) -> None:
        async with self._changed:
            if node in self._busy:  # not lost meanwhile
                self._busy[node] -= 1
                if not self._busy[node]:
                    self._idle_since[node] = time.monotonic()
            self._changed.notify_all()

    def _join(self, node: str, busy: int = 0) -> None:
        self._busy[node], self._idle_since[node] = busy, time.monotonic()
        self._deaths[node] = asyncio.get_running_loop().create_future()

    def _on_event(self, event: NodeEvent) -> None:
        """Every node event of the pool's cluster: a pool node that fails or stops without the pool asking is lost
        (its `ray start` or VM ended, its host agent lost it)."""
        if event.node in self._busy and event.state in TERMINAL:
            self._lose(event.node, event.detail or f"it was {event.state.value}")

    def _lose(self, node: str, reason: str) -> None:
        """`node` died: its calls raise, it leaves the pool now and is stopped; replaced up to `min`."""
        if node not in self._busy:
            return
        del self._busy[node], self._idle_since[node]
        self._deaths.pop(node).set_result("the pool was closed" if self._closing else reason)
        if not self._closing:
            self.lost.append({"node": node, "reason": reason, "at": time.time()})
            asyncio.get_running_loop().create_task(self._after_loss(node))

    async def _after_loss(self, node: str) -> None:
        async with self._changed:
            self._changed.notify_all()  # a call waiting for a slot may boot a node in its place now
        await self._run.engine.remove([node], grace=0)
        missing = self.min - len(self._busy) - self._growing
        if missing <= 0 or self._closing:
            return
        self._growing += missing
        try:
            records = await self._run.engine.add(missing)
        except HearthError:  # no GPUs free for it now: the next call tries again
            records = []
        finally:
            self._growing -= missing
        async with self._changed:
            for record in records:
                if record.ready and not self._closing:
                    self._join(record.node_id)
            self._changed.notify_all()
        await self._run.engine.remove([r.node_id for r in records if not r.ready])

    async def _tend(self) -> None:
        """Stop nodes idle for idle_shutdown_after, keeping `min` of them; while calls run, look at Ray's view
        of the nodes (a raylet that dies inside a live VM ends no process here)."""
        while True:
            await asyncio.sleep(min(TEND_S, self.idle_shutdown_after / 4))
            if any(self._busy.values()):
                await self._check_ray()
            async with self._changed:
                idle = [n for n, busy in self._busy.items()
                        if not busy and time.monotonic() - self._idle_since[n] >= self.idle_shutdown_after]
                idle = idle[:max(len(self._busy) - self.min, 0)]
                for node in idle:
                    del self._busy[node], self._idle_since[node], self._deaths[node]
            if idle:
                await self._run.engine.remove(idle)

    async def _check_ray(self) -> None:
        """Pool nodes whose Ray node is DEAD in the head's view are lost, with Ray's words."""
        try:
            nodes = await self._run.head.nodes()
        except (httpx.HTTPError, KeyError, ValueError, AttributeError):
            return  # the head is busy or going: next time
        dead = {n.get("node_id"): n.get("state_message") for n in nodes if n.get("state") == "DEAD"}
        for node in list(self._busy):
            record = self._run.engine.nodes.get(node)
            if record is not None and record.ray_node_id in dead:
                message = dead[record.ray_node_id]
                self._lose(node, "Ray declared its raylet dead" + (f" ({message})" if message else ""))

    async def _close(self) -> None:
        self._closing = True
        if self._tender is not None:
            self._tender.cancel()
        if not self._started.done():
            self._started.cancel()
        await self._run.down()
        for node in list(self._busy):  # calls still running end now, saying why
            self._lose(node, "the pool was closed")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and math.isfinite(timeout) and timeout > 0):
        raise SpecError(f"timeout is a number of seconds above 0, or None for no limit (got {timeout!r})")


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__qualname__', None) or repr(fn)}()"


def _cancel(ref: Any) -> None:
    """End a call's Ray task (and its worker: a function stuck in C code never sees a polite cancel). Quiet: the
    task may have finished meanwhile, or its node be gone."""
    import ray

    with contextlib.suppress(Exception):
        ray.cancel(ref, force=True)


_remote = None


def _call_remote():
    """codesync.call as a Ray remote function, made once per process (Ray exports it once)."""
    global _remote
    if _remote is None:
        import ray

        from provisioner import codesync

        _remote = ray.remote(codesync.call)
    return _remote
