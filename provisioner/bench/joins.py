"""Local Ray joins, like with like: hearth's `local` backend beside Ray's own `ray start`, against one Ray head.

    hearth parallel   the engine boots N local nodes at once (each a `ray start --block`, hearth's way)
    Ray parallel      N `ray start --address ... --block` launched at once, each a fresh interpreter as Ray's CLI
                      is, with the same ports, labels and temp dirs a hearth node gets
    hearth sequential one node at a time (the engine scales up by one, N times)
    Ray sequential    one plain `ray start` at a time, each waited for

Ray's CLI runs here with the two corrections every hearth node's `ray start` has (guest/agent.py: a raylet may
take longer than 30 s to register, and it is told its agent's port): plain `ray start` fails on a loaded
2-core machine ("The current node timed out during startup", 3 nodes at once, load 4-6), and neither
correction makes a start faster. So the two differ only in how each node's `ray start` comes to run.

Each counts from the first start until the head shows every node ALIVE, polled every 0.25 s in both cases
(the engine's own poll). hearth's nodes fork from its launcher (launcher.py), which a cluster starts while its
head starts: its own start is timed apart (`launcher_start_s`), not counted, as the head's is not. One head serves all four (its start is reported, not counted), so what differs is only
how nodes start. The order alternates between the two kinds so that neither always runs on a warmer machine.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from provisioner.backends.local import LocalBackend
from provisioner.bench.cpu import cpu_of
from provisioner.engine import Engine
from provisioner.processes import die_with_parent, signal_leader, terminate
from provisioner.ray_head import RayHead, free_ports, local_env, ray_start
from provisioner.spec import cluster_spec

POLL_S = 0.25
JOIN_TIMEOUT_S = 300.0


async def _alive(head: RayHead, cluster: str, count: int, processes=(), timeout: float = JOIN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.returncode is not None:
                raise RuntimeError(f"a `ray start` of {cluster} exited with status {process.returncode}")
        nodes = await head.nodes()
        alive = sum(1 for n in nodes if n.get("state") == "ALIVE" and (n.get("labels") or {}).get("hearth.io/cluster") == cluster)
        if alive >= count:
            return
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{count} Ray nodes of {cluster} were not alive within {timeout:g} s")


async def hearth_nodes(head: RayHead, work_dir: Path, name: str, nodes: int, parallel: bool) -> dict[str, Any]:
    """hearth's local backend against `head`: all at once (`engine.up`) or one at a time (`engine.add(1)`)."""
    spec = cluster_spec(nodes=nodes if parallel else 0, name=name)
    backend = LocalBackend(work_dir / name)
    started = time.monotonic()
    await backend.open()  # in a cluster, the launcher imports Ray while the head starts: timed, not counted
    launcher = await backend.launcher()
    launcher_s = time.monotonic() - started
    engine = Engine(spec, backend, head=head, hosts=["local"])
    started = time.monotonic()
    try:
        await engine.up()
        for _ in range(0 if parallel else nodes):
            added = await engine.add(1)
            if not all(r.ready for r in added):
                raise RuntimeError(f"a hearth node did not join: {[r.errors for r in added]}")
        joined = time.monotonic() - started
        pids = [r.process.process.pid for r in engine.nodes.values()]
        cpu = cpu_of(pids)
    finally:
        await engine.down()
        await backend.close()
    return {"joined_s": round(joined, 3), "cpu_s_per_node": round(sum(c.own + c.children for c in cpu.values()) / nodes, 3),
            "launcher": launcher is not None, "launcher_start_s": round(launcher_s, 3)}


async def ray_nodes(head: RayHead, work_dir: Path, name: str, nodes: int, parallel: bool) -> dict[str, Any]:
    """Ray's own CLI against `head`: N `ray start --block` at once, or one after another (each until ALIVE)."""
    host = head.address.rsplit(":", 1)[0]
    processes: list[asyncio.subprocess.Process] = []

    async def start(index: int) -> None:
        low = free_ports(1)[0]
        temp = work_dir / name / str(index)
        temp.mkdir(parents=True, exist_ok=True)
        processes.append(await asyncio.create_subprocess_exec(
            *ray_start(), f"--address={head.address}", "--block", "--num-cpus=1", "--num-gpus=0",
            f"--labels=hearth.io/cluster={name},hearth.io/node={name}-{index}", f"--node-ip-address={host}",
            f"--temp-dir={temp}", "--disable-usage-stats", f"--min-worker-port={low}",
            f"--max-worker-port={min(low + 99, 65535)}",
            stdin=asyncio.subprocess.DEVNULL, stdout=open(temp / "out.log", "wb"), stderr=asyncio.subprocess.STDOUT,
            env=local_env(**head.env), start_new_session=True, preexec_fn=die_with_parent))

    started = time.monotonic()
    try:
        for index in range(nodes):
            await start(index)
            if not parallel:
                await _alive(head, name, index + 1, processes)
        await _alive(head, name, nodes, processes)
        joined = time.monotonic() - started
        cpu = cpu_of([p.pid for p in processes])
    finally:
        await asyncio.gather(*(terminate(p, 10, polite=signal_leader(p)) for p in processes), return_exceptions=True)
    return {"joined_s": round(joined, 3), "cpu_s_per_node": round(sum(c.own + c.children for c in cpu.values()) / nodes, 3)}


async def compare(nodes: int, work_dir: Path, sequential: bool = True) -> dict[str, Any]:
    """hearth vs Ray, parallel (and sequential), on one head; `ratio_to_ray` is hearth's parallel join time over
    Ray's parallel one."""
    head = RayHead(work_dir / "head")
    started = time.monotonic()
    await head.start()
    result: dict[str, Any] = {"nodes": nodes, "head_s": round(time.monotonic() - started, 3)}
    try:
        result["ray_parallel"] = await ray_nodes(head, work_dir, "rp", nodes, parallel=True)
        result["hearth_parallel"] = await hearth_nodes(head, work_dir, "hp", nodes, parallel=True)
        if sequential:
            result["hearth_sequential"] = await hearth_nodes(head, work_dir, "hs", nodes, parallel=False)
            result["ray_sequential"] = await ray_nodes(head, work_dir, "rs", nodes, parallel=False)
    finally:
        await head.stop()
    hearth, ray = result["hearth_parallel"], result["ray_parallel"]
    result["ratio_to_ray"] = round(hearth["joined_s"] / ray["joined_s"], 3)
    # as if the launcher's start did not overlap the head's (it does in a cluster): the bound on the other side
    result["ratio_to_ray_with_launcher_start"] = round((hearth["joined_s"] + hearth["launcher_start_s"]) / ray["joined_s"], 3)
    if sequential:
        result["ratio_to_ray_sequential"] = round(result["hearth_sequential"]["joined_s"]
                                                  / result["ray_sequential"]["joined_s"], 3)
    return result
