"""`Cluster`: a GPU cluster in a notebook cell.

    with Cluster(nodes=4, gpus_per_node=1) as cluster:   # boots at once, shows itself, waits on enter
        ray.get([train.remote(cfg) for cfg in configs])  # Ray is connected in this kernel once ready

A thin synchronous front over `ClusterRun`, driven on hearth's background loop (see loop.py), so a cell
never awaits. In Jupyter it displays a live widget; elsewhere a progress line. When the kernel dies without
running any cleanup, the nodes still end: local node processes and the Ray head die with this process
(PR_SET_PDEATHSIG), and VM guests power off when their guest channel's host end goes away.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import weakref
from pathlib import Path
from typing import Any

from provisioner import loop
from provisioner.run import ClusterRun, default_work_dir
from provisioner.events import NodeEvent
from provisioner.progress import ProgressLine
from provisioner.spec import cluster_spec, default_backend
from provisioner.hosts import load_inventory
from provisioner.files import write_atomic
from provisioner.supervisor import state_root
from provisioner.widget import LiveView, in_notebook, summary_html

_open: weakref.WeakSet[Cluster] = weakref.WeakSet()


class Cluster:
    def __init__(self, nodes: int = 2, gpus_per_node: int = 0, *, gpu_type: str | None = None, backend: str | None = None,
                 hosts: str | Path | None = None, image: str | Path | None = None, cpus: int = 1,
                 memory_gib: int = 4, boot_timeout: float = 300.0, min_nodes: int | None = None,
                 labels: dict[str, str] | None = None, env: dict[str, str] | None = None, name: str = "",
                 connect: bool = True, show: bool = True) -> None:
        """Validate (errors before anything starts), then start booting and show progress."""
        spec = cluster_spec(nodes=nodes, gpus_per_node=gpus_per_node, gpu_type=gpu_type,
                            backend=default_backend(backend, hosts),
                            image=image, cpus=cpus, memory_gib=memory_gib, boot_timeout=boot_timeout,
                            min_nodes=min_nodes, labels=labels or {}, env=env or {}, name=name)
        inventory = load_inventory(Path(hosts)) if hosts else None
        self.name = spec.name
        self._connect = connect
        self._connected = False
        self._watching = 0  # while > 0, _watched redraws four times a second; else each event does
        self._state_dir = state_root() / spec.name
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._run = ClusterRun(spec, default_work_dir(spec.name), inventory=inventory, on_event=self._on_event)
        self._view = LiveView(self._run.summary) if show and in_notebook() else None
        self._line = ProgressLine(spec.nodes) if show and self._view is None else None
        if self._view is not None:
            from IPython.display import display

            display(self._view.widget)
        elif self._line is not None:
            self._line.__enter__()
        self._boot = loop.submit(self._up())
        _open.add(self)

    # -- the verbs ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> Cluster:
        """Block until the cluster is ready (or raise why it is not); then Ray is connected here."""
        try:
            self._boot.result(timeout)
        finally:
            if self._boot.done() and self._line is not None:
                self._line.__exit__(None, None, None)
                self._line = None
        if self._connect and not self._connected:
            import ray

            self._run.head.use_in_this_process()
            if not ray.is_initialized():
                ray.init(address=self._run.head.address, logging_level="ERROR")
                self._connected = True
        return self

    def scale(self, nodes: int) -> Cluster:
        """Grow or shrink to `nodes` nodes; returns once the new nodes are ready or have failed."""
        self.wait()
        loop.run(self._watched(self._run.scale(nodes)))
        return self

    def adapt(self, minimum: int = 0, maximum: int = 64, idle_shutdown_after: float = 60.0) -> Cluster:
        """Scale with the work: nodes are added while Ray tasks wait for resources, and a node idle for
        `idle_shutdown_after` seconds is stopped, down to `minimum` (0: scale to zero)."""
        self.wait()

        async def start() -> None:
            self._run.adapt(minimum, maximum, idle_shutdown_after)

        loop.run(start())
        return self

    def submit_job(self, entrypoint: str, runtime_env: dict[str, Any] | None = None, **options: Any) -> str:
        """Submit a Ray job to the cluster (JobSubmissionClient); returns its id."""
        self.wait()
        return self._run.submit_job(entrypoint, runtime_env, **options)

    def job_client(self):
        self.wait()
        return self._run.job_client()

    def logs(self, node: str) -> str:
        """A node's console and its VMM's log (a VM's serial console: kernel, initramfs, guest agent), or a
        local node's `ray start` output; each size-bounded."""
        return loop.run(self._run.engine.nodes[node].process.logs())

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Each node: id, host, GPUs, state, Ray node id, attempts, errors, boot profile, events."""
        return self._run.summary()["nodes"]

    @property
    def dashboard_url(self) -> str | None:
        return self._run.head.dashboard_url if self._run.head else None

    @property
    def status(self) -> str:
        return self._run.status

    def close(self) -> None:
        """Stop every node and the Ray head. Idempotent; also runs at interpreter exit."""
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
        if not self._boot.done():
            self._boot.cancel()
        loop.run(self._watched(self._run.down()))
        if self._line is not None:
            self._line.__exit__(None, None, None)
            self._line = None
        _open.discard(self)

    def __enter__(self) -> Cluster:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return summary_html(self._run.summary())

    def __repr__(self) -> str:
        summary = self._run.summary()
        ready = sum(n["state"] == "ready" for n in summary["nodes"])
        return f"<hearth.Cluster {self.name}: {summary['status']}, {ready}/{len(summary['nodes'])} nodes ready>"

    # -- plumbing ----------------------------------------------------------------------------------
    async def _up(self) -> None:
        await self._watched(self._run.up())

    async def _watched(self, work) -> Any:
        """Run `work` while redrawing the live view and recording state for `hearth status`/the page."""
        task = asyncio.ensure_future(work)
        self._watching += 1
        try:
            while not task.done():
                self._redraw()
                await asyncio.wait({task}, timeout=0.25)
            return task.result()
        finally:
            self._watching -= 1
            self._redraw()

    def _on_event(self, event: NodeEvent) -> None:
        if self._line is not None:
            self._line.update(event)
        if not self._watching:  # a change outside a boot or scale (adapt, a node dying): show it
            self._redraw()

    def _redraw(self) -> None:
        if self._view is not None:
            self._view.redraw()
        write_atomic(self._state_dir / "state.json", json.dumps(self._run.summary(), indent=1))


@atexit.register
def _close_all() -> None:
    """A backstop: clusters still open when the interpreter exits normally are closed."""
    for cluster in list(_open):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 (exiting anyway)
            pass
