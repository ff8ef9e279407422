"""`hearth bench boot`: does a cluster come up in about its slowest node's time, and what does it cost? Figures,
in one run, printed (never asserted: tests check only that they are consistent).

    vms.py    stand-in VM clusters: N nodes in parallel through host agents against each node booted alone with
              the same seed (`ratio_to_solo`), and where the time went (controller, agents, stand-ins, SSH CPU;
              waiting for boot slots); agent requests per node, by purpose
    fleet.py  many hosts on this machine: agents with their own sysfs trees, some behind a loopback sshd
    joins.py  local Ray joins: hearth's local backend beside Ray's own `ray start`, parallel and sequential
    plot.py   the picture: one row per node, its phases on a shared time axis (matplotlib, an optional extra)
    cpu.py    CPU seconds of processes and their descendants, from /proc
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Benchmarks that print figures and ratios.", no_args_is_help=True)


async def stand_in_runs(tmp: Path, *, one_host_nodes: int, hosts: int, host_nodes: int, median: float, seed: int,
                        solo_top: int, ssh_every: int, say, fork: bool = True,
                        max_concurrent_boots: int | None = None) -> tuple[dict[str, Any], dict[str, dict]]:
    """The one-host run (`parallel`) and the many-host run (`hosts`), and the solo boots both are compared with."""
    from provisioner.bench.vms import light_standin
    from provisioner.ch.standin_zygote import forked_standins

    if not fork:
        return await _stand_in_runs(tmp, light_standin(tmp / "bin"), None, one_host_nodes=one_host_nodes, hosts=hosts,
                                    host_nodes=host_nodes, median=median, seed=seed, solo_top=solo_top,
                                    ssh_every=ssh_every, say=say, max_concurrent_boots=max_concurrent_boots)
    with forked_standins(tmp / "z") as (standin, zygote):
        return await _stand_in_runs(tmp, standin, zygote, one_host_nodes=one_host_nodes, hosts=hosts,
                                    host_nodes=host_nodes, median=median, seed=seed, solo_top=solo_top,
                                    ssh_every=ssh_every, say=say, max_concurrent_boots=max_concurrent_boots)


async def _stand_in_runs(tmp: Path, standin: str, zygote: int | None, *, one_host_nodes: int, hosts: int,
                         host_nodes: int, median: float, seed: int, solo_top: int, ssh_every: int,
                         say, max_concurrent_boots: int | None) -> tuple[dict[str, Any], dict[str, dict]]:
    from provisioner.bench.fleet import fleet
    from provisioner.bench.vms import SoloBoots, measure

    image = tmp / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / name).write_bytes(b"\0" * 4096)
    results: dict[str, Any] = {}
    summaries: dict[str, dict] = {}
    # the solo boots use this host too: its boot slots cannot slow a node booted alone
    with fleet(tmp / "one", 1, standin=standin, ssh_every=0, gpus=False,
               max_concurrent_boots=max_concurrent_boots) as one:
        solo = SoloBoots(one.hosts[0], one.agents[0].pid, zygote, image, tmp / "w", median)
        if one_host_nodes:
            say(f"booting {one_host_nodes} stand-in VMs in parallel on one host, then the slowest alone ...")
            results["parallel"], summaries["parallel"] = await measure(
                "bench", one_host_nodes, one.hosts, gpus=0, median=median, seed=seed, solo=solo, solo_top=solo_top,
                image=image, work_dir=tmp / "w", agent_pids=[one.agents[0].pid], zygote_pid=zygote)
        if hosts:
            say(f"starting {hosts} host agents with 8 GPUs each (every {ssh_every}th through SSH) ...")
            with fleet(tmp / "f", hosts, standin=standin, ssh_every=ssh_every,
                       max_concurrent_boots=max_concurrent_boots) as many:
                say(f"booting {host_nodes} stand-in VMs with a GPU each over {hosts} hosts, then the slowest alone ...")
                results["hosts"], summaries["hosts"] = await measure(
                    "fleet", host_nodes, many.hosts, gpus=1, median=median, seed=seed, solo=solo, solo_top=solo_top,
                    image=image, work_dir=tmp / "w", agent_pids=[a.pid for a in many.agents],
                    sshd_pid=many.sshd.pid if many.sshd else None, zygote_pid=zygote)
        results["solo_boots"] = {"measured": solo.measured, "distinct_seeds": len(solo.times)}
    return results, summaries


@app.command()
def boot(
    nodes: Annotated[int, typer.Option(help="Stand-in VMs to boot: on one host, or over --hosts hosts.")] = 64,
    hosts: Annotated[int, typer.Option(help="Host agents for a many-host run (1: one host only). Each has 8 GPUs "
                                            "on a sysfs tree of its own; every --ssh-every-th is reached through a "
                                            "loopback sshd.")] = 1,
    one_host_nodes: Annotated[int, typer.Option(help="With --hosts > 1: nodes of the one-host run beside it "
                                                     "(0: skip it).")] = 64,
    ssh_every: Annotated[int, typer.Option(help="Every Nth host through SSH (0: none).")] = 4,
    median: Annotated[float, typer.Option(help="Median stand-in boot time, seconds.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Node i's stand-in seed is seed + i.")] = 0,
    solo_top: Annotated[int, typer.Option(help="Boot alone the nodes with the N longest drawn boots (0: every "
                                               "node). Fewer can only raise the ratio.")] = 8,
    fork_standins: Annotated[bool, typer.Option(help="Fork the stand-in VMMs from one process that imported it "
                                                     "(as light as a native VMM's start), rather than start an "
                                                     "interpreter for each.")] = True,
    max_concurrent_boots: Annotated[int | None, typer.Option(help="Each host's max_concurrent_boots (default: "
                                                                  "none); the time nodes wait for a slot is reported.")] = None,
    local_nodes: Annotated[int, typer.Option(help="Local Ray nodes to join, hearth vs Ray (0: skip).")] = 3,
    sequential: Annotated[bool, typer.Option(help="Also join the local nodes one at a time, both ways.")] = True,
    plot: Annotated[Path | None, typer.Option(help="Draw the boot timeline to this PNG (needs hearth[plot]).")] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Cluster-ready time against each node's solo boot, the control plane's cost, and local Ray joins."""
    if plot is not None:
        from provisioner.bench.plot import require_matplotlib

        require_matplotlib()  # before minutes of benchmarking, not after
    console = Console(stderr=json_output, highlight=False)
    results: dict[str, Any] = {"load_average": {"start": list(os.getloadavg())}}
    if hosts > 1:
        one, many, many_nodes = one_host_nodes, hosts, nodes
    else:
        one, many, many_nodes = nodes, 0, 0
    with tempfile.TemporaryDirectory(prefix="hb-", dir="/tmp") as tmp:
        if one or many:
            figures, summaries = asyncio.run(stand_in_runs(
                Path(tmp), one_host_nodes=one, hosts=many, host_nodes=many_nodes, median=median, seed=seed,
                solo_top=solo_top, ssh_every=ssh_every, say=console.print, fork=fork_standins,
                max_concurrent_boots=max_concurrent_boots))
            figures["standins"] = "forked from a zygote" if fork_standins else "an interpreter each (python -IS)"
            results.update(figures)
            if plot is not None:
                from provisioner.bench.plot import draw

                draw(summaries, plot)
                console.print(f"timeline drawn to {plot}")
        if local_nodes:
            from provisioner.bench.joins import compare

            console.print(f"joining {local_nodes} local Ray nodes: Ray's ray start, then hearth's ...")
            results["local"] = asyncio.run(compare(local_nodes, Path(tmp) / "l", sequential=sequential))
    results["load_average"]["end"] = list(os.getloadavg())
    if json_output:
        typer.echo(json.dumps(results, indent=2))
        return
    console.print(_table(results))


def _table(results: dict[str, Any]) -> Table:
    table = Table(title="hearth bench boot", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = []
    for key, what in (("parallel", "one host"), ("hosts", "many hosts")):
        if key not in results:
            continue
        p = results[key]
        where = f"{p['nodes']} VMs on {p['hosts']} host{'s' if p['hosts'] > 1 else ''}" + (
            f" ({p['ssh_hosts']} through SSH)" if p["ssh_hosts"] else "")
        rows += [
            (f"[b]{what}[/b]: {where}, cluster ready", f"{p['cluster_ready_s']:.2f} s"),
            (f"  slowest solo boot (of the {p['solo_measured']} longest drawn)", f"{p['solo_slowest_s']:.2f} s"),
            ("  ratio_to_solo", f"{p['ratio_to_solo']:.3f}"),
            ("  placement to ready, slowest / median node (in parallel)",
             f"{p['placed_to_ready_max_s']:.2f} / {p['placed_to_ready_median_s']:.2f} s"),
            ("  controller CPU per node", f"{p['controller_ms_per_node']:.1f} ms"),
            ("  host agent CPU per node", f"{p['agent_ms_per_node']:.1f} ms"),
            ("  stand-in VMM CPU per node", f"{p['standin_ms_per_node']:.1f} ms"),
            ("  sshd CPU per node", f"{p['sshd_ms_per_node']:.1f} ms"),
            ("  waiting for a boot slot, total / slowest", f"{p['slot_wait_s']['total']:.2f} / {p['slot_wait_s']['max']:.2f} s"),
            ("  agent requests per node, to ready / in all", f"{p['agent_requests_per_node']:.2f} / "
                                                            f"{p['agent_requests_per_node_total']:.2f}"),
        ]
    if "local" in results:
        local = results["local"]
        rows += [(f"[b]local[/b]: {local['nodes']} Ray nodes, Ray's own parallel ray start",
                  f"{local['ray_parallel']['joined_s']:.2f} s"),
                 ("  hearth, in parallel", f"{local['hearth_parallel']['joined_s']:.2f} s"),
                 ("  ratio_to_ray", f"{local['ratio_to_ray']:.3f}")]
        if "ray_sequential" in local:
            rows += [("  one at a time: Ray / hearth", f"{local['ray_sequential']['joined_s']:.2f} / "
                                                       f"{local['hearth_sequential']['joined_s']:.2f} s"),
                     ("  ratio_to_ray, one at a time", f"{local['ratio_to_ray_sequential']:.3f}")]
        rows.append(("  Ray head start (not counted)", f"{local['head_s']:.2f} s"))
    load = results["load_average"]
    rows.append(("load average (1, 5, 15 min) at start / end",
                 " / ".join(", ".join(f"{x:.2f}" for x in load[k]) for k in ("start", "end"))))
    for row in rows:
        table.add_row(*row)
    return table
