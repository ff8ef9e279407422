"""Faults on the controller's side, each with the outcome it must have and, afterwards, nothing left behind:
a Pool node killed mid-call, the SSH connection to a host dropped (mid-boot and while ready), a GPU taken by
another controller between placement and boot (409, then the free GPUs are read again), and min_nodes
placing what fits. In the style of tests/test_faults.py: each test states the fault, the outcome and checks
the leaks. (A run directory pre-created by another user: tests/test_userdirs.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hosts import HGX_GPUS, hgx_h100
from hosttree import FakeKernel
from provisioner.errors import CallTimeout, NodeLost, PlacementError, SpecError
from provisioner.hosts import Inventory
from provisioner.run import ClusterRun
from provisioner.spec import cluster_spec
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
