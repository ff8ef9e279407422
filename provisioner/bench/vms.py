"""Stand-in VM clusters booted in parallel, and each node booted alone: the honest ratio, and where the time went.

    parallel    N nodes booted at once through host agents on the cloud-hypervisor stand-in (bench mode:
                no schema validation), from `ClusterRun.up()` until every node is ready
    solo        a node booted alone (a one-node cluster on an otherwise idle agent) with the same stand-in
                seed it gets in the parallel run; seeds go by node index, so node i of any run has the same
                boot time drawn, and a seed's solo time is measured once and reused
    ratio       parallel cluster-ready / the slowest solo boot among the run's nodes

Solo boots cost their own time, so by default only the nodes whose drawn boot times are the longest are
booted alone (`solo_top`). That can only make the slowest solo smaller than it is and the ratio larger: the
headline errs against hearth, never for it. `solo_top=0` boots every node alone.

The stand-in's guests run no Ray: a node is ready when its simulated guest agent says it joined, so this
measures hearth's control plane (controller, host agents, SSH), not Ray.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.bench.cpu import cpu_of
from provisioner.ch.standin import boot_delay
from provisioner.events import NodeState
from provisioner.hosts import Host, Inventory
from provisioner.run import ClusterRun
from provisioner.spec import cluster_spec

STANDIN = str(Path(sys.executable).with_name("cloud-hypervisor-standin"))
SOURCE = Path(__file__).resolve().parents[2]  # where the `provisioner` package is imported from
BOOT_TIMEOUT_S = 300.0  # hundreds of Python stand-ins starting at once on a small machine

# What each agent request is for (AgentClient.calls_by_purpose names them by route, or as said here).
PURPOSES = {
    "GET /v1/info": "per host: agent, VMM and VFIO state, and that the image is there",
    "GET /v1/gpus": "per host: the GPUs free for placement",
    "POST /v1/leases/{id}": "per host, every lease_s/3: this controller is alive",
    "PUT /v1/vms/{id}": "per node: lease its GPUs, start its VMM, vm.create, vm.boot; answers with its events",
    "follow the VM until ray_joined": "per node: one long poll until the guest says it joined (or failed)",
    "follow the VM until stopped": "per node: one long poll while it runs, ended by the controller at stop",
    "DELETE /v1/vms/{id}": "per node: stop it, free its GPUs",
    "DELETE /v1/leases/{id}": "per host: the controller is done",
}


def settings(median: float, seed: int) -> dict[str, Any]:
    """The stand-in's settings for one node: a log-normal boot around `median` with 5% stragglers 2.5x slower,
    a 0.2 s Ray join, the builtin guest, no validation (bench mode)."""
    return {"boot_s": {"median": median, "sigma": 0.25, "straggler_p": 0.05, "straggler_x": 2.5},
            "seed": seed, "guest": "builtin", "join_s": 0.2, "validate": False}


def light_standin(directory: Path) -> str:
    """The stand-in as benchmarks run it: `python -IS` (no site, no site-packages: in its bench mode it needs
    only the standard library and hearth's own modules), saving each VMM start the interpreter's site import.
    Named like the installed one, which is how a host agent tells the stand-in from a real VMM."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cloud-hypervisor-standin"
    path.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(SOURCE)!r})\n"
                    "from provisioner.ch.standin import main\nmain()\n")
    path.chmod(0o755)
    return str(path)


def node_index(node_id: str) -> int:
    return int(node_id.rsplit("-", 1)[1])


@dataclass
class Figures:
    """One cluster's boot, measured."""
    ready_s: float
    summary: dict[str, Any]
    slot_waits: list[float]
    cpu: dict[str, float]  # boot: controller, agents, standins, sshd (seconds)
    teardown_cpu: dict[str, float]
    requests_boot: int
    requests: Counter


async def boot_cluster(name: str, nodes: int, hosts: list[Host], node_settings, *, gpus: int, image: Path,
                       work_dir: Path, agent_pids: list[int], sshd_pid: int | None = None,
                       zygote_pid: int | None = None) -> Figures:
    """Boot a cluster of stand-in VMs, measure it, tear it down. A zygote's children (forked stand-ins, see
    standin_zygote.py) count as stand-in CPU, as an agent's children do."""
    spec = cluster_spec(nodes=nodes, gpus_per_node=gpus, backend="cloud-hypervisor", image=image, name=name,
                        boot_timeout=BOOT_TIMEOUT_S)
    run = ClusterRun(spec, work_dir / name, inventory=Inventory(hosts=hosts), standin=node_settings, with_ray=False)
    watched = agent_pids + ([sshd_pid] if sshd_pid else []) + ([zygote_pid] if zygote_pid else [])
    before, cpu0, started = cpu_of(watched), time.process_time(), time.monotonic()
    try:
        await run.up()
        ready_s = time.monotonic() - started
        controller = time.process_time() - cpu0
        at_ready = cpu_of(watched)
        clients = list(run.backend.agents.values())
        requests_boot = sum(c.calls for c in clients)
        summary = run.summary()
        slot_waits = [r.slot_wait_s for r in run.engine.nodes.values()]
    finally:
        cpu1 = time.process_time()
        await run.down()
        teardown_controller = time.process_time() - cpu1
    after = cpu_of(watched)
    requests = sum((c.calls_by_purpose for c in clients), Counter())

    def split(a, b) -> dict[str, float]:
        agents = [p for p in agent_pids if p in a and p in b]
        zygote = [p for p in [zygote_pid] if p in a and p in b]
        return {"agents": sum(b[p].own - a[p].own for p in agents),
                "standins": sum(b[p].children - a[p].children for p in agents)
                + sum(b[p].own + b[p].children - a[p].own - a[p].children for p in zygote),
                "sshd": (b[sshd_pid].children - a[sshd_pid].children) if sshd_pid in a and sshd_pid in b else 0.0}

    return Figures(ready_s, summary, slot_waits, {"controller": controller, **split(before, at_ready)},
                   {"controller": teardown_controller, **split(at_ready, after)}, requests_boot, requests)


@dataclass
class SoloBoots:
    """Nodes booted alone on one idle local agent, cached by seed."""
    host: Host
    agent_pid: int
    zygote_pid: int | None
    image: Path
    work_dir: Path
    median: float
    times: dict[int, float] = field(default_factory=dict)
    measured: int = 0

    async def time_of(self, seed: int) -> float:
        if seed not in self.times:
            figures = await boot_cluster(f"solo{seed}", 1, [self.host], lambda _: settings(self.median, seed), gpus=0,
                                         image=self.image, work_dir=self.work_dir, agent_pids=[self.agent_pid],
                                         zygote_pid=self.zygote_pid)
            self.times[seed] = figures.ready_s
            self.measured += 1
        return self.times[seed]


async def measure(name: str, nodes: int, hosts: list[Host], *, gpus: int, median: float, seed: int, solo: SoloBoots,
                  solo_top: int, image: Path, work_dir: Path, agent_pids: list[int],
                  sshd_pid: int | None = None, zygote_pid: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parallel boot of `nodes` nodes over `hosts`, then the solo boots it is compared with: its figures
    (JSON-able) and its summary (for the picture)."""
    seeds = {i: seed + i for i in range(nodes)}
    draws = {i: boot_delay(settings(median, s)) for i, s in seeds.items()}
    figures = await boot_cluster(name, nodes, hosts, lambda node_id: settings(median, seeds[node_index(node_id)]),
                                 gpus=gpus, image=image, work_dir=work_dir, agent_pids=agent_pids, sshd_pid=sshd_pid,
                                 zygote_pid=zygote_pid)
    chosen = sorted(draws, key=draws.get, reverse=True)[:solo_top or nodes]
    cached = sum(seeds[i] in solo.times for i in chosen)
    solo_times = {i: await solo.time_of(seeds[i]) for i in chosen}
    slowest_solo = max(solo_times, key=solo_times.get)
    nodes_summary = {n["id"]: n for n in figures.summary["nodes"]}
    placed_to_ready = {node_index(n): _span(s, "placed", "ready") for n, s in nodes_summary.items()}
    slowest_parallel = max(placed_to_ready, key=placed_to_ready.get)
    ssh_hosts = sum(h.address != "local" for h in hosts)
    per_node = lambda seconds: round(1000 * seconds / nodes, 2)  # noqa: E731
    result = {
        "nodes": nodes, "hosts": len(hosts), "ssh_hosts": ssh_hosts, "gpus_per_node": gpus,
        "cluster_ready_s": round(figures.ready_s, 3),
        "solo_slowest_s": round(solo_times[slowest_solo], 3),
        "ratio_to_solo": round(figures.ready_s / solo_times[slowest_solo], 3),
        "solo_measured": len(chosen), "solo_reused": cached, "slowest_draw_s": round(max(draws.values()), 3),
        "placed_to_ready_max_s": round(max(placed_to_ready.values()), 3),
        "placed_to_ready_median_s": round(statistics.median(placed_to_ready.values()), 3),
        "controller_ms_per_node": per_node(figures.cpu["controller"]),
        "agent_ms_per_node": per_node(figures.cpu["agents"]),
        "standin_ms_per_node": per_node(figures.cpu["standins"]),
        "sshd_ms_per_node": per_node(figures.cpu["sshd"]),
        "teardown_ms_per_node": {k: per_node(v) for k, v in figures.teardown_cpu.items()},
        "slot_wait_s": {"total": round(sum(figures.slot_waits), 3), "max": round(max(figures.slot_waits), 3)},
        "agent_requests_per_node": round(figures.requests_boot / nodes, 3),
        "agent_requests_per_node_total": round(sum(figures.requests.values()) / nodes, 3),
        "agent_requests": {k: {"count": v, "for": PURPOSES.get(k, "")} for k, v in sorted(figures.requests.items())},
        "cpu_s": {k: round(v, 3) for k, v in figures.cpu.items()},
        "cores": os.cpu_count(),
        "slowest_solo": {"node": slowest_solo, "seed": seeds[slowest_solo], "draw_s": round(draws[slowest_solo], 3),
                         "solo_s": round(solo_times[slowest_solo], 3),
                         "parallel_placed_to_ready_s": round(placed_to_ready[slowest_solo], 3)},
        "slowest_in_parallel": {"node": slowest_parallel, "draw_s": round(draws[slowest_parallel], 3),
                                "placed_to_ready_s": round(placed_to_ready[slowest_parallel], 3),
                                "profile": nodes_summary[f"{name}-{slowest_parallel}"]["profile"]},
        "phase_medians_s": _phase_medians(figures.summary["nodes"]),
        "solo_s": {str(i): round(t, 3) for i, t in sorted(solo_times.items())},
        "draws_s": {str(i): round(draws[i], 3) for i in chosen},
    }
    return result, figures.summary


def _span(node: dict[str, Any], start: str, end: str) -> float:
    times = {e["state"]: e["at"] for e in node["events"]}
    return times[end] - times[start]


def _phase_medians(nodes: list[dict[str, Any]]) -> dict[str, float]:
    phases = [s.value for s in (NodeState.vmm_started, NodeState.booting, NodeState.guest_up, NodeState.ray_joined,
                                NodeState.ready)]
    return {p: round(statistics.median(n["profile"].get(p, 0.0) for n in nodes), 3) for p in phases}
