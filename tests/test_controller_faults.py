"""Faults on the controller's side, each with the outcome it must have and, afterwards, nothing left behind:
a Pool node killed mid-call, the SSH connection to a host dropped (mid-boot and while ready), a GPU taken by
another controller between placement and boot (409, then the free GPUs are read again), and min_nodes
placing what fits. In the style of tests/test_faults.py: each test states the fault, the outcome and checks
the leaks. (A run directory pre-created by another user: tests/test_userdirs.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hosts import HGX_GPUS, hgx_h100
from hosttree import FakeKernel
from provisioner.errors import CallTimeout, NodeLost, PlacementError, SpecError
from provisioner.events import NodeState
from provisioner.hosts import Inventory
from provisioner.run import ClusterRun
from provisioner.spec import cluster_spec
from test_agent import agent_http, never_leased_twice
from test_engine import processes_mentioning
from vfio.bind import apply, plan_bind
from vfio.hostroot import HostRoot


@pytest.fixture
def isolated(tmp_path, run_dir, monkeypatch):
    """State and run directories of this test's own, for this process and the ones it starts."""
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HEARTH_RUN_DIR", str(run_dir))
    return run_dir


def _until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_pool_node_killed_mid_call_raises_in_the_caller_and_leaves_the_pool(isolated, tmp_path):
    """FLAME's rule: a call whose node dies raises in the caller (the node's own reason), never hangs; the node
    leaves the pool and is replaced up to `min`; `idempotent=True` runs the call again elsewhere; `timeout`
    ends a call (and its task) that would run forever."""
    from provisioner import Pool

    def hold(marker: str, value: int) -> tuple[str, int]:
        import ray

        node = ray.get_runtime_context().get_node_labels()["hearth.io/node"]
        if not os.path.exists(marker + ".done"):  # the first time: say where, and hold until the node is killed
            open(marker, "w").write(node)
            time.sleep(600)
        return node, value

    def kill_node_of(pool, marker: Path) -> str:
        node = _until(lambda: marker.exists() and marker.read_text(), 120, "the call started")
        marker.with_name(marker.name + ".done").touch()
        process = pool._run.engine.nodes[node].process.process  # the node's `ray start --block`, leading its group
        os.killpg(process.pid, signal.SIGKILL)
        return node

    def square(x: int) -> int:
        return x * x

    with Pool(min=1, max=2, name="flaky", idle_shutdown_after=600, sync_code=False) as pool:
        first = pool.nodes[0]["id"]
        started = time.monotonic()
        call = pool.submit(hold, str(tmp_path / "a"), 1)
        assert kill_node_of(pool, tmp_path / "a") == first
        with pytest.raises(NodeLost) as lost:
            call.result(timeout=120)
        raised_after = time.monotonic() - started
        assert lost.value.node == first and "ray start exited with status -9" in lost.value.reason
        assert f"node {first} died during the call to" in str(lost.value) and "idempotent=True" in str(lost.value)
        assert [entry["node"] for entry in pool.lost] == [first]
        # it left the pool, and a replacement keeps the pool at min=1
        _until(lambda: [n["id"] for n in pool.nodes if n["state"] == "ready" and n["id"] != first], 180,
               "a replacement node")
        assert first not in [n["id"] for n in pool.nodes]
        again = pool.call(hold, str(tmp_path / "a"), 2, timeout=120)  # .done exists: returns at once
        assert again[0] != first and again[1] == 2

        # idempotent: its node killed mid-call, the call runs once more on another node and returns
        call = pool.submit(hold, str(tmp_path / "b"), 3, idempotent=True)
        second = kill_node_of(pool, tmp_path / "b")
        node, value = call.result(timeout=240)
        assert value == 3 and node not in (first, second)
        assert [entry["node"] for entry in pool.lost] == [first, second]

        # timeouts: the task is cancelled (its worker ended) and the pool goes on
        with pytest.raises(CallTimeout, match="did not finish within 3 s; its Ray task was cancelled"):
            pool.call(time.sleep, 600, timeout=3)
        with pytest.raises(CallTimeout, match="within 4 s"):
            pool.map(time.sleep, [600, 0], timeout=4)
        assert pool.map(square, [2, 3], timeout=120) == [4, 9]
        with pytest.raises(SpecError, match="timeout is a number of seconds above 0"):
            pool.call(square, 2, timeout=float("nan"))
        assert len(pool.nodes) <= 2
    print(f"\nNodeLost raised {raised_after:.1f} s after the call started (the node killed mid-call)")
    assert processes_mentioning(str(isolated)) == []


# -- placement: what fits with min_nodes, and a GPU taken by another controller (409) ------------------------
def test_place_what_fits_places_in_order_and_says_why_the_rest_do_not():
    from provisioner.placement import GpuSlot, place, place_what_fits

    free = [GpuSlot(host="a", address=f"0000:{bus:02x}:00.0", numa=i // 4) for i, bus in enumerate(range(0x10, 0x16))]
    ids = [f"n{i}" for i in range(10)]
    placed, short = place_what_fits(ids, 1, ["a"], free)
    assert [p.node_id for p in placed] == ids[:6] and len({g.address for p in placed for g in p.gpus}) == 6
    assert short.startswith("need 10 nodes x 1 GPUs = 10 GPUs, but only 6 are free: a 6 (NUMA 0: 4, NUMA 1: 2)")
    split = [GpuSlot(host="a", address=f"0000:{bus:02x}:00.0", numa=int(i >= 3)) for i, bus in enumerate(range(0x10, 0x18))]
    placed, short = place_what_fits(["big0", "big1"], 4, ["a"], split)  # 8 free, 3 + 5: room for one node of 4
    assert [p.node_id for p in placed] == ["big0"] and "no host has 4 free GPUs" in short and "1 of 2 placed" in short
    assert place_what_fits(ids[:3], 1, ["a"], free)[1] is None
    with pytest.raises(PlacementError, match="only 6 are free"):
        place(ids, 1, ["a"], free)


@pytest.fixture
def gpu_host(tmp_path, agents):
    """An agent on the cloud-hypervisor STAND-IN whose host tree has HGX H100s: `gpu_host(n)` binds the first n
    to vfio-pci (NUMA node 0 holds the first four, 1 the rest) and returns the inventory reaching it."""

    def make(count: int = 8) -> Inventory:
        root = tmp_path / "host"
        tree = hgx_h100(root)
        with FakeKernel(tree):
            apply(HostRoot(root), plan_bind(HostRoot(root), HGX_GPUS[:count], nvml=None))
        return Inventory(hosts=[agents.start("gpu01", root=root)])

    return make


def _run(name, nodes, inventory, run_dir, image, **fields) -> ClusterRun:
    spec = cluster_spec(nodes=nodes, gpus_per_node=1, backend="cloud-hypervisor", image=image, name=name,
                        pack_env=False, boot_timeout=60, **fields)
    return ClusterRun(spec, run_dir / name, inventory=inventory, with_ray=False,
                      standin=lambda node: {"boot_s": 0.2, "guest": "builtin", "join_s": 0.1})


def _nothing_left(agents, name: str = "gpu01") -> None:
    vms = agents.vms(name)
    assert processes_mentioning(f"{vms}/") == [], "VMMs left"
    assert list((agents.state(name) / "vms").iterdir()) == [], "leases left"
    assert never_leased_twice(agents.state(name)) == {}


@pytest.fixture
def image(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / name).write_bytes(b"\0" * 4096)
    return image


@pytest.mark.slow
def test_min_nodes_boots_what_fits_and_says_which_were_not_placed(gpu_host, agents, run_dir, image):
    """10 nodes asked, min_nodes=1, 6 GPUs free: 6 boot, 4 fail at once with why; min_nodes=7: refused before
    anything starts."""
    inventory = gpu_host(6)
    refused = _run("seven", 10, inventory, run_dir, image, min_nodes=7)
    with pytest.raises(PlacementError, match="only 6 of 10 nodes fit, fewer than min_nodes 7: need 10 nodes x 1 GPUs"):
        asyncio.run(refused.up())
    assert refused.summary()["nodes"] == [] and not any(agents.vms("gpu01").glob("*"))
    run = _run("some", 10, inventory, run_dir, image, min_nodes=1)

    async def scenario():
        ready = await run.up()
        summary = run.summary()
        await run.down()
        return ready, summary

    ready, summary = asyncio.run(scenario())
    nodes = {n["id"]: n for n in summary["nodes"]}
    assert len(ready) == 6 and all(nodes[f"some-{i}"]["state"] == "ready" for i in range(6))
    for i in range(6, 10):
        node = nodes[f"some-{i}"]
        assert node["state"] == "stopped" and node["host"] is None and node["attempts"] == 1
        assert node["errors"] == ["not placed: need 10 nodes x 1 GPUs = 10 GPUs, but only 6 are free: "
                                  "gpu01 6 (NUMA 0: 4, NUMA 1: 2). Ask for fewer, or bind more GPUs on the hosts "
                                  "(hearth vfio bind --all-gpus --persist)"]
    assert summary["status"] == "ready"
    _nothing_left(agents)


@pytest.mark.slow
def test_a_gpu_taken_after_placement_409_then_the_retry_reads_the_hosts_again(gpu_host, agents, run_dir, image):
    """Placed on what the host had free, then another controller takes those GPUs (and every GPU of their NUMA
    node) before the boot: the agent answers 409, and the retry goes to GPUs free now, read again from the
    host, not to the neighbours the stale list still shows free."""
    inventory = gpu_host(8)
    late = _run("late", 2, inventory, run_dir, image)
    thief = _run("thief", 4, inventory, run_dir, image)

    async def scenario():
        late.engine.offer(await late.backend.open())
        late.engine.plan()
        planned = {g.address for r in late.engine.nodes.values() for g in r.placement.gpus}
        await thief.up()
        stolen = {g.address for r in thief.engine.nodes.values() for g in r.placement.gpus}
        try:
            await late.engine.up()
            return planned, stolen, late.summary()
        finally:
            await asyncio.gather(late.down(), thief.down())

    planned, stolen, summary = asyncio.run(scenario())
    assert planned < stolen == set(HGX_GPUS[:4])  # the thief took NUMA node 0, our two included
    for node in summary["nodes"]:
        assert node["state"] == "ready" and node["attempts"] == 2, node
        assert "is leased to VM thief-" in node["errors"][0]
        assert set(node["gpus"]) <= set(HGX_GPUS[4:])  # not GPUs 2 and 3, which the stale list had free
    _nothing_left(agents)


# -- SSH: the connection to a host dropped, mid-boot and while ready ----------------------------------------
def _drop_ssh_connections(sshd) -> int:
    """Kill the test sshd's per-connection processes (every descendant of its listener), as a restarted sshd or
    a reset network does to an established connection. The listener stays: connecting again works."""
    master = int((Path(sshd["known_hosts"]).parent / "sshd.pid").read_text())
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    doomed, todo = [], list(children.get(master, []))
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo += children.get(pid, [])
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(doomed)


@pytest.mark.slow
@pytest.mark.root("the test's sshd runs as root")
@pytest.mark.requires("sshd")
def test_a_dropped_ssh_connection_is_made_again_mid_boot_and_while_ready(sshd, agents, run_dir, image):
    """The SSH connection to a host is cut twice: while its VMs are in vm.boot, and once they are ready. The
    controller connects again each time; the boot goes on (no node fails or is retried), the nodes' watches
    resume (a VM stopped on the host afterwards is seen as stopped), and the lease is renewed again (the VMs
    outlive more than a lease period after the drop)."""
    local = agents.start("b")
    host = local.model_copy(update={"address": sshd["address"], "ssh_identity": sshd["identity"],
                                    "ssh_known_hosts": sshd["known_hosts"]})
    spec = cluster_spec(nodes=2, backend="cloud-hypervisor", image=image, name="ssh", pack_env=False, boot_timeout=120)
    lease_s = 6.0
    run = ClusterRun(spec, run_dir / "ssh", inventory=Inventory(hosts=[host]), with_ray=False, lease_s=lease_s,
                     standin=lambda node: {"boot_s": 4.0, "guest": "builtin", "join_s": 0.1})

    async def until(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
            await asyncio.sleep(0.1)

    async def scenario():
        booting = asyncio.create_task(run.up())
        # the agent answers a PUT once vm.boot did (4 s here): with both VMMs started, both PUTs are in flight
        await until(lambda: len(processes_mentioning(f"{agents.vms('b')}/")) == 2 or booting.done(), 60,
                    "both VMMs started")
        assert not booting.done()
        tunnel = run.backend.agents["b"].tunnel
        assert _drop_ssh_connections(sshd) >= 1
        await until(lambda: tunnel.drops >= 1, 30, "the drop seen")
        await booting  # the PUTs in flight were lost with the connection: sent again, the same VMs answer
        mid_boot = tunnel.drops
        await until(lambda: tunnel.problem is None, 30, "the tunnel up again")
        _drop_ssh_connections(sshd)
        await until(lambda: tunnel.drops == mid_boot + 1 and tunnel.problem is None, 30, "connected again")
        await asyncio.sleep(lease_s * 1.5)  # had renewals not resumed, the agent would reap the VMs by now
        states = {n: r.history.state for n, r in run.engine.nodes.items()}
        on_host = {vm["id"]: vm["state"] for vm in agent_http(local.agent_socket).get("/v1/vms").json()}
        agent_http(local.agent_socket).delete("/v1/vms/ssh-1", params={"grace": 0})  # stopped on the host...
        await until(lambda: run.engine.nodes["ssh-1"].history.state == NodeState.stopped, 30,
                    "the stop seen through the new connection")  # ...and seen: the watch resumed
        summary = run.summary()
        await run.down()
        return mid_boot, tunnel.drops, states, on_host, summary

    mid_boot, drops, states, on_host, summary = asyncio.run(scenario())
    assert mid_boot >= 1 and drops == mid_boot + 1
    assert states == {"ssh-0": NodeState.ready, "ssh-1": NodeState.ready}
    assert set(on_host) == {"ssh-0", "ssh-1"} and "stopped" not in on_host.values(), on_host
    assert all(n["attempts"] == 1 and n["errors"] == [] for n in summary["nodes"]), summary["nodes"]
    leases = (agents.state("b") / "leases.log").read_text()
    assert "lease expired" not in leases
    assert not (run_dir / "ssh" / "agents" / "b.sock").exists()
    _nothing_left(agents, "b")
