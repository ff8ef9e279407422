"""`hearth bench boot`: does a cluster come up in about its slowest node's time? Figures, in one run.

1. The Cloud Hypervisor STAND-IN with a realistic boot-time distribution (log-normal around a 2 s median,
   5% stragglers 2.5x slower), N VMs booted in parallel through a host agent: cluster-ready time, the
   slowest node's own boot time and their ratio; the controller's and the agent's CPU time per node;
   agent requests per node. Then the same N
   booted one after another, the baseline. The stand-in's guests run no Ray: a node counts as ready when
   its (simulated) guest agent says it joined, so this measures the control plane, not Ray.
2. The `local` backend with real Ray: the time until N Ray nodes have joined, beside Ray's own
   `ray.cluster_utils.Cluster` adding the same N nodes, in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from provisioner.agent.server import spawn
from provisioner.run import ClusterRun, default_work_dir
from provisioner.events import NodeState
from provisioner.spec import cluster_spec
from provisioner.hosts import Host, Inventory

app = typer.Typer(help="Benchmarks that print figures and ratios.", no_args_is_help=True)
STANDIN = str(Path(sys.executable).with_name("cloud-hypervisor-standin"))


def standin_latency(median: float, seed: int) -> dict[str, Any]:
    return {"boot_s": {"median": median, "sigma": 0.25, "straggler_p": 0.05, "straggler_x": 2.5},
            "seed": seed, "guest": "builtin", "join_s": 0.2}


async def ch_parallel(nodes: int, median: float, name: str, tmp: Path, concurrent: bool = True) -> dict[str, Any]:
    """Boot `nodes` stand-in VMs through a host agent (all at once, or one cluster after another) and measure."""
    image = tmp / "image"
    agent = spawn(tmp / "agent.sock", tmp / f"state-{name}", tmp / "vms", cloud_hypervisor=STANDIN, host_root=tmp,
                  log=tmp / "agent.log")
    inventory = Inventory(hosts=[Host(name="local", agent_socket=tmp / "agent.sock")])

    def settings(node_id: str) -> dict[str, Any]:
        return standin_latency(median, zlib.crc32(node_id.encode()))

    async def one(count: int, suffix: str) -> tuple[float, list[dict[str, float]], float, int]:
        spec = cluster_spec(nodes=count, backend="cloud-hypervisor", image=image, name=f"{name}{suffix}",
                            boot_timeout=120)
        run = ClusterRun(spec, default_work_dir(spec.name), inventory=inventory, standin=settings, with_ray=False)
        started = time.time()
        try:
            await run.up()
            ready = time.time() - started
            own = [_own_times(r.history) for r in run.engine.nodes.values()]
            calls = sum(a.calls for a in run.backend.agents.values())
        finally:
            await run.down()
        return ready, own, run.engine.control_cpu_s, calls

    try:
        if concurrent:
            agent_cpu = _cpu_s(agent.pid)
            ready, own, cpu, calls = await one(nodes, "")
            agent_cpu = _cpu_s(agent.pid) - agent_cpu
            slowest = max(o["own"] for o in own)
            return {"nodes": nodes, "cluster_ready_s": ready, "slowest_node_s": slowest, "ratio": ready / slowest,
                    "median_node_s": statistics.median(o["own"] for o in own),
                    "median_vm_boot_s": statistics.median(o["vm_boot"] for o in own),
                    "control_plane_ms_per_node": 1000 * cpu / nodes, "agent_ms_per_node": 1000 * agent_cpu / nodes,
                    "agent_requests_per_node": calls / nodes}
        started = time.time()
        for index in range(nodes):
            await one(1, f"-s{index}")
        return {"nodes": nodes, "sequential_s": time.time() - started}
    finally:
        agent.terminate()
        agent.wait()


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far (its children not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_times(history) -> dict[str, float]:
    times = {e.state: e.at for e in history.events}
    return {"own": times[NodeState.ready] - times[NodeState.placed],
            "vm_boot": times[NodeState.guest_up] - times[NodeState.booting]}


async def local_join(nodes: int) -> dict[str, Any]:
    spec = cluster_spec(nodes=nodes, name="bench-local")
    run = ClusterRun(spec, default_work_dir(spec.name))
    started = time.time()
    try:
        await run.head.start()
        head = time.time() - started
        await run.engine.up()
        joined = time.time() - started - head
    finally:
        await run.down()
    return {"nodes": nodes, "head_s": head, "nodes_joined_s": joined}


def ray_cluster_utils(nodes: int) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    head = time.time() - started
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, wait=True)
        cluster.wait_for_nodes()
        joined = time.time() - started - head
    finally:
        cluster.shutdown()
    return {"nodes": nodes, "head_s": head, "nodes_joined_s": joined}


@app.command()
def boot(
    nodes: Annotated[int, typer.Option(help="Stand-in VMs to boot.")] = 64,
    median: Annotated[float, typer.Option(help="Median stand-in boot time, seconds.")] = 2.0,
    sequential: Annotated[bool, typer.Option(help="Also boot them one after another (the baseline).")] = True,
    local_nodes: Annotated[int, typer.Option(help="Local Ray nodes to join (0: skip).")] = 3,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Cluster-ready time versus the slowest node, the control plane's cost, and Ray joins."""
    console = Console(stderr=json_output, highlight=False)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-", dir="/tmp") as tmp:
        image = Path(tmp) / "image"
        image.mkdir()
        for name in ("vmlinuz", "initrd.img", "rootfs.img"):
            (image / name).write_bytes(b"\0" * 4096)
        console.print(f"booting {nodes} stand-in VMs in parallel, through a host agent ...")
        results["parallel"] = asyncio.run(ch_parallel(nodes, median, "bench", Path(tmp)))
        if sequential:
            console.print(f"booting the same {nodes} one after another (baseline) ...")
            results["sequential"] = asyncio.run(ch_parallel(nodes, median, "bench", Path(tmp), concurrent=False))
            results["sequential"]["ratio"] = results["sequential"]["sequential_s"] / results["parallel"]["slowest_node_s"]
    if local_nodes:
        console.print(f"joining {local_nodes} local Ray nodes with hearth, then with ray.cluster_utils ...")
        results["local"] = asyncio.run(local_join(local_nodes))
        results["ray_cluster_utils"] = ray_cluster_utils(local_nodes)
        results["local"]["ratio_to_ray"] = (results["local"]["nodes_joined_s"]
                                            / results["ray_cluster_utils"]["nodes_joined_s"])
    if json_output:
        typer.echo(json.dumps(results, indent=2))
        return
    console.print(_table(results))


def _table(results: dict[str, Any]) -> Table:
    table = Table(title="hearth bench boot", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    p = results["parallel"]
    rows = [
        (f"stand-in: {p['nodes']} VMs in parallel, cluster ready", f"{p['cluster_ready_s']:.2f} s"),
        ("stand-in: slowest node's own boot", f"{p['slowest_node_s']:.2f} s"),
        ("stand-in: cluster ready / slowest node", f"{p['ratio']:.3f}"),
        ("stand-in: median node boot (VMM start to ready)", f"{p['median_node_s']:.2f} s"),
        ("controller CPU per node", f"{p['control_plane_ms_per_node']:.1f} ms"),
        ("host agent CPU per node", f"{p['agent_ms_per_node']:.1f} ms"),
        ("agent requests per node", f"{p['agent_requests_per_node']:.1f}"),
    ]
    if "sequential" in results:
        s = results["sequential"]
        rows += [(f"stand-in: the same {s['nodes']} one after another", f"{s['sequential_s']:.2f} s"),
                 ("sequential / slowest node (baseline ratio)", f"{s['ratio']:.2f}")]
    if "local" in results:
        local, ray_utils = results["local"], results["ray_cluster_utils"]
        rows += [(f"local: {local['nodes']} Ray nodes joined (hearth, after the head)", f"{local['nodes_joined_s']:.2f} s"),
                 (f"local: {ray_utils['nodes']} nodes added by ray.cluster_utils.Cluster", f"{ray_utils['nodes_joined_s']:.2f} s"),
                 ("hearth / ray.cluster_utils", f"{local['ratio_to_ray']:.2f}"),
                 ("Ray head start (hearth / cluster_utils)", f"{local['head_s']:.2f} s / {ray_utils['head_s']:.2f} s")]
    for row in rows:
        table.add_row(*row)
    return table
