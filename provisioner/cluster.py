"""`Cluster`: a GPU cluster in a notebook cell.

    with Cluster(nodes=4, gpus_per_node=1) as cluster:   # boots at once, shows itself, waits on enter
        ray.get([train.remote(cfg) for cfg in configs])  # Ray is connected in this kernel once ready

A thin synchronous front over `ClusterRun`, driven on hearth's background loop (see loop.py), so a cell
never awaits. In Jupyter it displays a live view (view.py); elsewhere a progress line. When the kernel dies
without running any cleanup, the nodes still end: local node processes and the Ray head die with this
process (PR_SET_PDEATHSIG), and VM guests power off when their guest channel's host end goes away.

Cells get re-run, so:
- A `Cluster` named like one still open in this kernel closes that one first, and says so in one line. One
  named like a cluster another process runs (`hearth up`, another kernel) is refused: two live clusters
  never share a run directory. Without a name, each cluster gets one no other open cluster has.
- The kernel has one Ray connection, and it follows the cluster whose `wait()` ran last: a connection to
  another cluster is shut down before this one's token is put in place (RayHead.connect).

Ctrl-C during `wait()` stops the waiting, not the boot: the boot began with `Cluster(...)`, and a user who
interrupts a wait to look at something else should not lose nodes half-booted (VMs with GPUs are slow to
get back). One line says that the cluster keeps booting and how to stop it; the view keeps following it.
In a `with` block the cluster belongs to the block, so Ctrl-C while entering it tears it down, as Ctrl-C
in `hearth up` does.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import os
import secrets
from pathlib import Path
from typing import Any

from provisioner import loop, userdirs
from provisioner.codesync import CodeTree
from provisioner.errors import HearthError, SpecError
from provisioner.events import NodeEvent
from provisioner.files import write_atomic
from provisioner.hosts import load_inventory
from provisioner.profile import NodeTable, cluster_profile_line
from provisioner.progress import ProgressLine
from provisioner.run import ClusterRun, default_work_dir
from provisioner.spec import cluster_spec, default_backend
from provisioner.supervisor import alive, read_state, state_root
from provisioner.view import HEARTBEAT_S, LiveView, in_notebook, jupyter_base_url, summary_html

_open: dict[str, Cluster] = {}  # the clusters open in this process (this kernel), by name


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while waiting for a cluster. IPython shows its one line, not the frames of the threads it
    interrupted; elsewhere it is a KeyboardInterrupt like any other."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class Cluster:
    def __init__(self, nodes: int = 2, gpus_per_node: int = 0, *, gpu_type: str | None = None, backend: str | None = None,
                 hosts: str | Path | None = None, image: str | Path | None = None, cpus: int = 1,
                 memory_gib: int = 4, boot_timeout: float = 300.0, min_nodes: int | None = None,
                 labels: dict[str, str] | None = None, env: dict[str, str] | None = None, name: str = "",
                 sync_code: bool = True, pack_env: bool = True, connect: bool = True, show: bool = True) -> None:
        """Validate (errors before anything starts), then start booting and show progress."""
        spec = cluster_spec(nodes=nodes, gpus_per_node=gpus_per_node, gpu_type=gpu_type,
                            backend=default_backend(backend, hosts),
                            image=image, cpus=cpus, memory_gib=memory_gib, boot_timeout=boot_timeout,
                            min_nodes=min_nodes, labels=labels or {}, env=env or {}, name=name or "unnamed",
                            pack_env=pack_env)
        inventory = load_inventory(Path(hosts)) if hosts else None
        self._code = CodeTree() if sync_code else None  # the notebook's code and data on every node
        if self._code is not None:
            self._code.snapshot()  # too big a directory is refused now, before anything starts
        if not name:  # picked once the request is valid: looking for a free name reads the state directory
            spec = spec.model_copy(update={"name": _unused_name()})
        self.name = spec.name
        self._connect = connect
        self._watching = 0  # while > 0, _watched redraws four times a second; else each event does
        self._run = ClusterRun(spec, default_work_dir(spec.name), inventory=inventory, on_event=self._on_event)
        _take_name(spec.name)  # last of the checks: it may close this kernel's cluster of that name
        self._state_dir = userdirs.ensure(state_root() / spec.name, "state directory")
        if self._run.head is not None:  # for the Jupyter extension's dashboard proxy; never in state.json
            write_atomic(self._state_dir / "token", self._run.head.token, mode=0o600)
        self._view = LiveView(self._run.summary) if show and in_notebook() else None
        self._line = ProgressLine(spec.nodes) if show and self._view is None else None
        if self._line is not None:
            self._line.__enter__()
        _open[self.name] = self
        self._boot = loop.submit(self._up())
        if self._view is not None:
            loop.submit(self._heartbeat())

    # -- the verbs ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> Cluster:
        """Block until the cluster is ready (or raise why it is not); then this kernel's Ray is connected to
        it. Ctrl-C stops the waiting, not the boot."""
        if self._run.status == "stopped":
            raise HearthError(f"cluster {self.name} is closed; start another with Cluster(...)")
        try:
            self._boot.result(timeout)
        except KeyboardInterrupt:
            raise Interrupted(f"wait() interrupted; cluster {self.name} keeps booting (its view follows it): "
                              "cluster.wait() waits again, cluster.close() stops it") from None
        except concurrent.futures.CancelledError:
            raise HearthError(f"cluster {self.name} was closed before it was ready; start another with "
                              "Cluster(...)") from None
        finally:
            if self._boot.done() and self._line is not None:
                self._line.__exit__(None, None, None)
                self._line = None
        if self._connect:
            self._run.head.connect(self._code)
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
    def nodes(self) -> NodeTable:
        """Each node: id, host, GPUs, state, Ray node id, attempts, errors, boot profile, events; a list of
        dicts that a notebook shows as a table."""
        summary = self._run.summary()
        profile = cluster_profile_line(summary)
        return NodeTable(summary["nodes"], summary["backend"],
                         caption=f"cluster {self.name}: {summary['status']}" + (f" ({profile})" if profile else ""))

    @property
    def dashboard_url(self) -> str | None:
        """The Ray dashboard's own address (for API clients with the token; browsers use the view's link)."""
        return self._run.head.dashboard_url if self._run.head else None

    @property
    def status(self) -> str:
        return self._run.status

    def close(self) -> None:
        """Stop every node and the Ray head. Idempotent; also runs at interpreter exit."""
        if self._run.head is not None:
            self._run.head.disconnect()
        if not self._boot.done():
            self._boot.cancel()
        loop.run(self._watched(self._run.down()))
        (self._state_dir / "token").unlink(missing_ok=True)
        if self._view is not None:
            self._view.end()
        if self._line is not None:
            self._line.__exit__(None, None, None)
            self._line = None
        if _open.get(self.name) is self:
            del _open[self.name]

    def __enter__(self) -> Cluster:
        try:
            return self.wait()
        except BaseException as error:
            self.close()
            if isinstance(error, KeyboardInterrupt):
                raise Interrupted(f"interrupted while cluster {self.name} booted for this with block; "
                                  "it was torn down") from None
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return summary_html(self._run.summary(), base_url=jupyter_base_url())

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

    async def _heartbeat(self) -> None:
        """Redraw the live view now and then while nothing changes, so it can tell when the kernel is gone."""
        while not self._view.ended:
            await asyncio.sleep(HEARTBEAT_S)
            if not self._watching:
                self._redraw()

    def _on_event(self, event: NodeEvent) -> None:
        if self._line is not None:
            self._line.update(event)
        if not self._watching:  # a change outside a boot or scale (adapt, a node dying): show it
            self._redraw()

    def _redraw(self) -> None:
        if self._view is not None:
            self._view.redraw()
        write_atomic(self._state_dir / "state.json", json.dumps({**self._run.summary(), "owner": "kernel"}, indent=1))


def _unused_name() -> str:
    while True:
        name = f"hearth-{secrets.token_hex(3)}"
        if name not in _open and not alive(read_state(state_root() / name)):
            return name


def _take_name(name: str) -> None:
    """Close this kernel's open cluster of that name (a re-run cell), or refuse another process's."""
    previous = _open.get(name)
    if previous is not None:
        print(f"hearth: closing cluster {name}, started earlier in this kernel, to start the new one in its place")
        previous.close()
        return
    state = read_state(state_root() / name)
    if alive(state) and state["pid"] != os.getpid() and state.get("status") in ("new", "booting", "ready"):
        raise SpecError(f"a cluster named {name} is running in another process (pid {state['pid']}: `hearth up` or "
                        f"another kernel): pick another name=, or stop that one first (`hearth down --name {name}`, "
                        "or close() in its notebook)")


@atexit.register
def _close_all() -> None:
    """A backstop: clusters still open when the interpreter exits normally (a kernel restart or shutdown)
    are closed. Their views say so first, for frontends still listening (JupyterLab stops listening to a
    kernel it restarts; there the view's stale-kernel notice tells)."""
    for cluster in list(_open.values()):
        if cluster._view is not None:
            try:
                cluster._view.end(note="The kernel exited (restarted or shut down), and this cluster with it.")
            except Exception:  # noqa: BLE001 (exiting anyway)
                pass
    for cluster in list(_open.values()):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 (exiting anyway)
            pass
