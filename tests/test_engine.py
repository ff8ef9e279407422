"""The cluster engine: spec and placement (pure), the failure policy on the Cloud Hypervisor STAND-IN at
scale, and real Ray on the local backend (a head and two nodes: this machine has 2 cores)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from hosts import HGX_GPUS, hgx_h100
from hosttree import FakeKernel
from leaks import token_leaks
from provisioner.run import ClusterRun
from provisioner.errors import BootError
from provisioner.errors import SpecError
from provisioner.events import NodeState
from provisioner.ch.api import ChClient
from provisioner.errors import PlacementError
from provisioner.placement import GpuSlot, place
from provisioner.spec import cluster_spec
from provisioner.hosts import Inventory, load_inventory
from vfio.bind import apply, plan_bind
from vfio.hostroot import HostRoot


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line mentions `text` (a cluster's run directory, say)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cmdline = " ".join(argv)
        if text in cmdline and "State:\tZ" not in status and int(pid) != os.getpid():
            if argv[1:2] == ["-c"]:  # `python -c CODE ARGS`: the arguments say what it is, the code is long
                argv = [argv[0], "-c", "<code>", *argv[3:]]
            found.append(f"{pid}: {' '.join(argv)[:400]}")
    return found


@pytest.fixture
def image(tmp_path):
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    return tmp_path


def test_spec_errors_name_field_and_fix(tmp_path):
    with pytest.raises(SpecError) as bad:
        cluster_spec(nodes=-1, gpus_per_node=20, min_nodes=5, labels={"hearth.io/node": "x", "bad key!": "v"},
                     env={"RAY_AUTH_TOKEN": "x"}, backend="qemu-kvm", speed="fast")
    text = str(bad.value)
    for expected in ("nodes: ask for 0 to 1024 nodes", "gpus_per_node: a node has 0 to 16 GPUs",
                     "labels: label key 'hearth.io/node' uses a reserved prefix", "env: env RAY_AUTH_TOKEN",
                     "backend: Input should be 'local', 'cloud-hypervisor' or 'qemu'", "speed: Extra inputs are not permitted"):
        assert expected in text
    with pytest.raises(SpecError, match="min_nodes must be between 0 and nodes"):
        cluster_spec(nodes=2, min_nodes=3)
    with pytest.raises(SpecError, match="needs image= .* `hearth guest build`"):
        cluster_spec(backend="cloud-hypervisor")
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  - name: gpu01\n    address: ftp://gpu01\n  - name: gpu01\n")
    with pytest.raises(SpecError) as bad_hosts:
        load_inventory(hosts)
    assert "hosts.0.address: address is 'local' or ssh://user@host[:port]" in str(bad_hosts.value)
    hosts.write_text("hosts:\n  - name: gpu01\n    address: ssh://hearth@gpu01:2222\n    max_concurrent_boots: 4\n")
    assert load_inventory(hosts).hosts[0].max_concurrent_boots == 4


def test_placement_keeps_a_nodes_gpus_on_one_numa_node_or_clique():
    free = [GpuSlot(host="a", address=f"0000:{bus:02x}:00.0", numa=i // 4) for i, bus in enumerate(range(0x10, 0x18))]
    free += [GpuSlot(host="b", address=f"0000:{bus:02x}:00.0", numa=0) for bus in range(0x20, 0x22)]
    plan = place(["n0", "n1", "n2"], 2, ["a", "b"], free)
    assert all(len({(g.host, g.numa) for g in p.gpus}) == 1 for p in plan)
    assert len({g.address for p in plan for g in p.gpus}) == 6
    big = place(["big0", "big1"], 4, ["a", "b"], free)
    assert [{g.numa for g in p.gpus} for p in big] == [{0}, {1}] and {p.host for p in big} == {"a"}
    with pytest.raises(PlacementError, match="only 10 are free: a 8 \\(NUMA 0: 4, NUMA 1: 4\\); b 2 \\(NUMA 0: 2\\)"):
        place([f"n{i}" for i in range(11)], 1, ["a", "b"], free)
    with pytest.raises(PlacementError, match="no host has 8 free GPUs in one NVLink clique or NUMA node"):
        place(["n0"], 8, ["a", "b"], free)
    clique = [GpuSlot(host="a", address=s.address, numa=s.numa, clique=0) for s in free if s.host == "a"]
    assert len(place(["n0"], 8, ["a"], clique)[0].gpus) == 8


def _settings(faults: dict[str, list]):
    """Stand-in settings per node id: the fault for each successive attempt (None: boots fine)."""
    attempts: Counter = Counter()

    def settings(node_id: str) -> dict:
        attempts[node_id] += 1
        plan = faults.get(node_id, [])
        fault = plan[attempts[node_id] - 1] if attempts[node_id] <= len(plan) else None
        return {"boot_s": 0.2, "guest": "builtin", "fault": fault, "slow_x": 1000, "seed": 1}

    return settings


def _stand_in_run(spec, settings, run_dir, agents, events=None) -> ClusterRun:
    inventory = Inventory(hosts=[agents.start("a")])
    return ClusterRun(spec, run_dir / "c", inventory=inventory, standin=settings, with_ray=False,
                      on_event=events.append if events is not None else None)


def _nothing_left(agents, name="a") -> None:
    vms = agents.vms(name)
    assert processes_mentioning(f"{vms}/") == [] and not any(vms.rglob("*.sock*"))
    assert list((agents.state(name) / "vms").iterdir()) == []


@pytest.mark.slow
def test_64_nodes_with_failures_retries_and_timeouts(image, run_dir, agents):
    faults = {f"big-{i}": ["boot-fails"] for i in (3, 17, 40)}  # fail once, then boot on the retry
    faults |= {f"big-{i}": ["slow-boot", "slow-boot"] for i in (9, 50)}  # time out twice: lost
    faults["big-22"] = ["crash-mid-boot"]
    # boot_timeout leaves room for 64 Python stand-ins starting at once on 2 cores; a slow boot takes 200 s
    spec = cluster_spec(nodes=64, backend="cloud-hypervisor", image=image, name="big", boot_timeout=30, min_nodes=60)
    events = []
    run = _stand_in_run(spec, _settings(faults), run_dir, agents, events)

    async def scenario():
        ready = await run.up()
        summary = run.summary()
        await run.down()
        return ready, summary

    ready, summary = asyncio.run(scenario())
    assert len(ready) == 62, [(n["id"], n["errors"]) for n in summary["nodes"] if n["state"] != "ready"]
    nodes = {n["id"]: n for n in summary["nodes"]}
    for node_id in ("big-3", "big-17", "big-40", "big-22"):
        assert nodes[node_id]["state"] == "ready" and nodes[node_id]["attempts"] == 2
    assert "vm.boot answered 500" in nodes["big-3"]["errors"][0]
    assert "exited with status 101" in nodes["big-22"]["errors"][0]
    for node_id in ("big-9", "big-50"):
        assert nodes[node_id]["state"] == "stopped" and nodes[node_id]["attempts"] == 2
        # the host's own words (its deadline is the node's), or ours if they did not arrive in time
        assert len(nodes[node_id]["errors"]) == 2 and all(
            "vm.boot did not answer before the node's boot deadline" in e
            or e == "not ready within boot_timeout (30 s)" for e in nodes[node_id]["errors"]), nodes[node_id]
    retried = [e for e in events if e.state == NodeState.requested and e.detail and e.detail.startswith("retry")]
    assert len(retried) == 6
    _nothing_left(agents)


@pytest.mark.slow
def test_below_min_nodes_everything_is_torn_down(image, run_dir, agents):
    faults = {f"few-{i}": ["boot-fails", "boot-fails"] for i in (1, 4, 6)}
    spec = cluster_spec(nodes=8, backend="cloud-hypervisor", image=image, name="few", boot_timeout=20, min_nodes=6)
    run = _stand_in_run(spec, _settings(faults), run_dir, agents)
    with pytest.raises(BootError) as failed:
        asyncio.run(run.up())
    text = str(failed.value)
    assert "only 5 of 8 nodes became ready (min_nodes 6); everything was torn down" in text
    assert "few-4: host a: cloud-hypervisor vm.boot answered 500" in text and "; then " in text
    assert run.status == "failed"
    assert all(n["state"] == "stopped" for n in run.summary()["nodes"])
    _nothing_left(agents)


@pytest.mark.slow
def test_cancel_half_way_tears_everything_down(image, run_dir, agents):
    spec = cluster_spec(nodes=8, backend="cloud-hypervisor", image=image, name="cancel", boot_timeout=60)
    settings = lambda node_id: {"boot_s": 5.0, "guest": "builtin"}  # noqa: E731
    run = _stand_in_run(spec, settings, run_dir, agents)

    async def scenario():
        task = asyncio.create_task(run.up())
        # the env image is packed and carried first, which takes seconds under load: wait for the VMMs instead of
        # a fixed time; each boots for 5 s, so seeing all 8 means all 8 were booting at once
        deadline = time.monotonic() + 60
        while (booting := len(processes_mentioning(f"{agents.vms('a')}/"))) < 8 and not task.done():
            assert time.monotonic() < deadline, f"{booting} of 8 VMMs started in 60 s"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return booting

    assert asyncio.run(scenario()) == 8  # they were all booting at once
    assert run.status == "failed" and run.error == "cancelled"
    _nothing_left(agents)


@pytest.mark.slow
def test_gpu_nodes_get_their_iommu_groups(image, run_dir, tmp_path, agents):
    root = tmp_path / "host"
    tree = hgx_h100(root)
    with FakeKernel(tree):
        apply(HostRoot(root), plan_bind(HostRoot(root), HGX_GPUS, nvml=None))
    host = agents.start("gpu01", root=root).model_copy(update={"nvlink_cliques": [HGX_GPUS]})
    inventory = Inventory(hosts=[host])
    spec = cluster_spec(nodes=2, gpus_per_node=4, gpu_type="H100", backend="cloud-hypervisor", image=image, name="gpu")
    run = ClusterRun(spec, run_dir / "c", inventory=inventory, standin=_settings({}), with_ray=False)

    async def scenario():
        await run.up()
        configs = []
        for node in run.engine.nodes:
            client = ChClient(str(agents.vms("gpu01") / node / "api.sock"))
            configs.append((await client.info()).config)
            await client.aclose()
        await run.down()
        return configs

    configs = asyncio.run(scenario())
    devices = [[d["path"].rstrip("/").rsplit("/", 1)[1] for d in c["devices"]] for c in configs]
    assert sorted(itertools.chain(*devices)) == sorted(HGX_GPUS)
    assert all(d["x_nv_gpudirect_clique"] == 0 for c in configs for d in c["devices"])
    too_many = cluster_spec(nodes=3, gpus_per_node=4, backend="cloud-hypervisor", image=image, name="gpu")
    with pytest.raises(PlacementError, match="need 3 nodes x 4 GPUs = 12 GPUs, but only 8 are free"):
        asyncio.run(ClusterRun(too_many, run_dir / "c", inventory=inventory, with_ray=False).up())


@pytest.mark.slow
def test_local_cluster_joins_ray_runs_tasks_and_jobs_and_leaves_nothing(run_dir):
    import ray
    from provisioner.jobs import follow

    spec = cluster_spec(nodes=2, gpus_per_node=1, gpu_type="fake", name="ray2", labels={"team": "sweep"})
    run = ClusterRun(spec, run_dir)

    loop = asyncio.new_event_loop()  # one loop for up, the job and down: the node processes belong to it
    try:
        loop.run_until_complete(run.up())
        summary = run.summary()
        assert [n["state"] for n in summary["nodes"]] == ["ready", "ready"]
        assert all(n["ray_node_id"] and set(n["profile"]) >= {"guest_up", "ray_joined", "ready"} for n in summary["nodes"])
        run.head.use_in_this_process()
        ray.init(address=run.head.address, logging_level="ERROR")
        try:
            where = ray.remote(num_gpus=1)(lambda: ray.get_runtime_context().get_node_labels())
            labels = ray.get([where.options(label_selector={"hearth.io/node": n}).remote() for n in spec.node_ids()])
            assert [(l["hearth.io/node"], l["hearth.io/gpu-type"], l["team"]) for l in labels] == [
                ("ray2-0", "fake", "sweep"), ("ray2-1", "fake", "sweep")]
            ray_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert {n["ray_node_id"] for n in summary["nodes"]} <= ray_ids
        finally:
            ray.shutdown()
        client = run.job_client()
        job = run.submit_job("python -c \"import ray, os; ray.init(); print('job sees', len(ray.nodes()), 'nodes as', os.environ['WHO'])\"",
                             runtime_env={"env_vars": {"WHO": "hearth"}})
        out = open(run_dir / "job.log", "w")
        assert loop.run_until_complete(asyncio.to_thread(follow, client, job, out)).value == "SUCCEEDED"
        assert "job sees 3 nodes as hearth" in (run_dir / "job.log").read_text()
    finally:
        loop.run_until_complete(run.down())
        loop.close()
        for key in run.head.env:
            os.environ.pop(key, None)
    time.sleep(0.5)
    assert processes_mentioning(str(run_dir)) == []


@pytest.mark.slow
def test_cli_up_status_job_down(tmp_path, run_dir):
    env = {**os.environ, "HEARTH_STATE_DIR": str(tmp_path / "state"), "HEARTH_RUN_DIR": str(run_dir),
           "COLUMNS": "200"}
    hearth = str(Path(sys.executable).with_name("hearth"))

    def run(*args, timeout=180):
        return subprocess.run([hearth, *args], capture_output=True, text=True, timeout=timeout, env=env)

    assert run("up", "--nodes=-1", "--name", "cli").returncode == 2
    up = run("up", "--nodes", "1", "--name", "cli")
    try:
        assert up.returncode == 0, up.stderr
        assert "cluster cli is up: 1 nodes" in up.stdout and "cli-0" in up.stdout
        again = run("up", "--nodes", "1", "--name", "cli")
        assert again.returncode == 1 and "already up" in again.stderr
        status_json = run("status", "--name", "cli", "--json").stdout
        state = json.loads(status_json)
        assert state["status"] == "ready" and state["nodes"][0]["state"] == "ready"
        job = run("job", "submit", "--name", "cli", "--", "python", "-c", "print('hello from', 6 * 7)")
        assert job.returncode == 0 and "hello from 42" in job.stdout and "SUCCEEDED" in job.stdout
        failing = run("job", "submit", "--name", "cli", "--", "python", "-c", "raise SystemExit(3)")
        assert failing.returncode == 1 and "FAILED" in failing.stdout
        # Ray's own tools, pointed at the cluster by `hearth connect`, the token never on a command line
        token_file = tmp_path / "state/clusters/cli/token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        exports = run("connect", "--name", "cli")
        assert exports.returncode == 0 and "RAY_AUTH_TOKEN_PATH=" in exports.stdout
        # The token's value, wherever it could leak: command lines, the head's, nodes' and Ray's logs and files,
        # the state files, what `hearth status`, `hearth up`, `hearth job` and `hearth connect` print
        assert token_leaks(token, dirs=(run_dir, tmp_path / "state"), texts={
            "status JSON": status_json, "status table": run("status", "--name", "cli").stdout,
            "output of hearth up": up.stdout + up.stderr, "output of hearth job": job.stdout + job.stderr,
            "output of hearth connect": exports.stdout}) == []
        venv = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
        tools = subprocess.run(["bash", "-c", f'eval "$({hearth} connect --name cli)"; ray status && '
                                "ray job submit -- python -c \"print('ray job ran', 6 * 7)\""],
                               capture_output=True, text=True, timeout=180, env=venv)
        assert tools.returncode == 0 and "Active:" in tools.stdout and "ray job ran 42" in tools.stdout, tools
        address = json.loads(run("status", "--name", "cli", "--json").stdout)["ray"]["address"]
        refused = subprocess.run(["bash", "-c", f"ray status --address {address}"], capture_output=True, text=True,
                                 timeout=120, env={k: v for k, v in venv.items() if not k.startswith("RAY_")})
        assert refused.returncode != 0  # without the token Ray's own tools are turned away
    finally:
        down = run("down", "--name", "cli")
    assert down.returncode == 0 and "cluster cli is down" in down.stdout
    assert processes_mentioning(str(run_dir)) == []
    assert run("job", "submit", "--name", "cli", "--", "true").returncode == 1
