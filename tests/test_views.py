"""What a notebook shows, without a cluster: the view's counts, phases, links and notices from summaries made
of real node histories; the node table; errors as IPython renders them; a local node's last words."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner.node import NodeSpec, RayJoin
from provisioner.backends.local import LocalNode
from provisioner.engine import NodeRecord
from provisioner.errors import BootError, InvalidTransition, SpecError
from provisioner.events import NodeHistory, NodeState, NodeTracker
from provisioner.placement import NodePlacement
from provisioner.profile import NodeTable
from provisioner.run import _node_summary
from provisioner.view import OUTCOMES, outcome, summary_html

T0 = 1_700_000_000.0
BOOT = ["requested", "placed", "vmm_started", "booting", "guest_up", "ray_joined", "ready"]


def node(node_id: str, *attempts: list[str], errors: tuple[str, ...] = ()) -> dict:
    """A node's summary after `attempts` (each a list of states, one second apart), as ClusterRun gives it."""
    record = NodeRecord(node_id, NodePlacement(node_id=node_id, host="local"), attempts=[], errors=list(errors))
    at = T0
    for states in attempts:
        history = NodeHistory(node_id)
        for state in states:
            at += 1.0
            history.transition(NodeState(state), "boom" if state == "failed" else None, at=at)
        record.attempts.append(history)
    return _node_summary(record)


def summary(status: str, nodes: list[dict], head: dict | None = None, **more) -> dict:
    return {"name": "c", "backend": "local", "status": status, "error": None, "nodes": nodes, "nodes_asked": len(nodes),
            "created_at": T0, "started_at": T0 + 8, "ready_at": None, "ended_at": None,
            "head": {"starting": T0 + 0.1, "up": T0 + 7.5} if head is None else head,
            "ray": {"address": "127.0.0.1:1", "dashboard": "http://127.0.0.1:2"}, **more}


def counts(html: str) -> dict[str, int]:
    text = re.sub(r"<[^>]+>", "", html.split('class="hearth-counts">')[1].split("</div>")[0])
    found = {name: int(n) for n, name in re.findall(r"(\d+) (ready|booting|failed|stopped)", text)}
    found["of"] = int(re.search(r"of (\d+) nodes", text).group(1))
    return found


def test_counts_add_up_in_every_state():
    failed_then_stopped = node("c-0", ["requested", "placed", "vmm_started", "failed", "stopping", "stopped"],
                               errors=("ray start exited with status 1; it printed nothing",))
    ready = node("c-1", BOOT)
    booting = node("c-2", BOOT[:4])
    retried = node("c-3", ["requested", "placed", "failed", "stopping", "stopped"], BOOT, errors=("timed out",))
    stopped = node("c-4", [*BOOT, "stopping", "stopped"])
    cases = [
        (summary("failed", [failed_then_stopped, failed_then_stopped | {"id": "c-1"}], ended_at=T0 + 40,
                 error="only 0 of 2 nodes became ready"), {"failed": 2}),
        (summary("stopped", [stopped, stopped | {"id": "c-5"}], ended_at=T0 + 99), {"stopped": 2}),
        (summary("booting", [ready, booting, failed_then_stopped, retried]), {"ready": 2, "booting": 1, "failed": 1}),
    ]
    for case, expected in cases:
        found = counts(summary_html(case, now=T0 + 50))
        assert found == {**dict.fromkeys(OUTCOMES, 0), **expected, "of": len(case["nodes"])}, found
    assert outcome(retried) == "ready"
    html = summary_html(cases[2][0], now=T0 + 50)
    assert "1 recovered on a retry" in html and "c-3</b> recovered on attempt 2; before: timed out" in html
    assert "c-0</b> failed: ray start exited with status 1; it printed nothing" in html
    assert "failed after 40.0 s" in summary_html(cases[0][0]) and "only 0 of 2 nodes became ready" in summary_html(cases[0][0])


def test_head_phase_elapsed_from_cluster_and_links_only_while_the_head_is_up():
    starting = summary("booting", [node("c-0", [])], head={"starting": T0 + 0.2})
    html = summary_html(starting, now=T0 + 3.2, base_url="/user/ann/")
    assert "booting, 0 of 1 ready, 3.2 s" in html  # counted from Cluster(...), the head's start included
    assert "starting the Ray head, 3.0 s" in html
    assert "Ray dashboard" not in html and 'href="/user/ann/hearth/"' in html

    ready = summary("ready", [node("c-0", BOOT)], ready_at=T0 + 12.5)
    html = summary_html(ready, now=T0 + 60, base_url="/user/ann/")
    assert "ready (Ray head 7.50 s, nodes 5.00 s, total 12.50 s)" in html and "started in 7.4 s" in html
    assert 'href="/user/ann/hearth/clusters/c/dashboard/"' in html
    assert "127.0.0.1:2" not in html  # the dashboard's own address (token-protected) is no use to a browser
    assert "Ray dashboard" not in summary_html(ready)  # no Jupyter server with hearth's extension: no link

    ended = summary("stopped", [node("c-0", [*BOOT, "stopping", "stopped"])],
                    head={"starting": T0, "up": T0 + 7, "stopped": T0 + 80}, ended_at=T0 + 80)
    assert "Ray dashboard" not in summary_html(ended, base_url="/") and "Ray head: stopped" in summary_html(ended)


def test_live_view_warns_when_the_kernel_goes_quiet_and_a_snapshot_says_when_it_was_taken():
    ready = summary("ready", [node("c-0", BOOT)], ready_at=T0 + 12.5)
    live, static = summary_html(ready, view="live", now=T0 + 13), summary_html(ready, now=T0 + 13)
    assert "hearth-stale" in live and "animation:hearth-stale 0s linear 12s forwards" in live
    linked = summary_html(ready, view="live", base_url="/")
    assert 'underline;animation:hearth-gone 0s linear 12s forwards">Ray dashboard' in linked  # goes with the kernel
    assert "hearth-stale" not in static and "as of " in static and "updated " in live
    ended = summary("stopped", [], ended_at=T0 + 20)
    assert "hearth-stale" not in summary_html(ended, view="live")  # an ended cluster's view is final: nothing to go stale
    failing = summary("failed", [], error="only 0 of 1 nodes became ready")  # tearing down: not final yet
    assert "hearth-stale" in summary_html(failing, view="live", base_url="/")
    assert "Ray dashboard" not in summary_html(failing, base_url="/")  # its head is about to go
    assert "hearth-updated" not in summary_html(ready, view="page")  # the status page refreshes itself


def test_node_table_names_phases_by_backend_and_rounds():
    nodes = [node("c-0", BOOT), node("c-1", ["requested", "placed", "failed", "stopping", "stopped"], BOOT,
                                     errors=("timed out",))]
    table = NodeTable(nodes, "local", caption="cluster c: ready")
    assert table == nodes and table[0]["id"] == "c-0"  # still the list of dicts it always was
    html = table._repr_html_()
    assert "<th>spawn</th><th>first output</th><th>ray start</th><th>seen by head</th><th>total</th>" in html
    assert "create+boot" not in html and "<td>1.00</td>" in html and "<td>6.00</td>" in html
    assert "recovered after: timed out" in html
    vm = NodeTable(nodes, "cloud-hypervisor")._repr_html_()
    assert "<th>place</th><th>VMM start</th><th>create+boot</th><th>guest agent up</th>" in vm


def test_expected_errors_render_as_their_message_and_bugs_in_full():
    error = SpecError("bad cluster spec:\n  - nodes: ask for 0 to 1024 nodes")
    assert error._render_traceback_() == ["\x1b[31mSpecError\x1b[0m: bad cluster spec:\n  - nodes: ask for 0 to 1024 nodes"]
    assert len(BootError("only 1 of 2 nodes became ready")._render_traceback_()) == 1
    try:
        raise InvalidTransition("c-0", NodeState.ready, NodeState.booting)
    except InvalidTransition as bug:
        lines = bug._render_traceback_()
    assert lines[0] == "Traceback (most recent call last):" and "ready -> booting" in lines[-1]


@pytest.mark.parametrize("script, words", [
    ("echo starting; echo 'it broke' >&2; exit 3", "ray start exited with status 3: starting | it broke"),
    ("exit 1", "ray start exited with status 1: it printed nothing"),
])
def test_a_local_node_that_fails_says_its_last_words(script, words, tmp_path, monkeypatch):
    fake = tmp_path / "ray"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr("provisioner.backends.local.ray_start", lambda: [str(fake)])

    async def boot() -> str:
        history = NodeHistory("c-0")
        tracker = NodeTracker(history)
        tracker.transition(NodeState.requested)
        tracker.transition(NodeState.placed)
        spec = NodeSpec(id="c-0", uid="u", host="local", ray=RayJoin(address="127.0.0.1:1", token="t"))
        local = LocalNode(tmp_path / "n", spec, tracker)
        await local.start(time.monotonic() + 30)
        with pytest.raises(Exception, match="failed before ray_joined"):
            await local.wait_for(NodeState.ray_joined, 30)
        return next(e.detail for e in history.events if e.state == NodeState.failed)

    assert asyncio.run(boot()) == words


def test_hearth_down_leaves_a_kernels_cluster_to_its_kernel(tmp_path):
    """`hearth down` signals the pid in the state file: for a notebook's cluster that is the kernel itself."""
    kernel = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "clusters").mkdir(mode=0o700)  # as hearth makes it: its own user's alone (userdirs.py)
        (tmp_path / "clusters" / "nb").mkdir(mode=0o700)
        (tmp_path / "clusters" / "nb" / "state.json").write_text(json.dumps(
            {"name": "nb", "pid": kernel.pid, "status": "ready", "owner": "kernel"}))
        down = subprocess.run([str(Path(sys.executable).with_name("hearth")), "down", "--name", "nb"], text=True,
                              capture_output=True, env={**os.environ, "HEARTH_STATE_DIR": str(tmp_path)}, timeout=120)
        assert down.returncode == 1 and "belongs to a notebook kernel" in down.stderr + down.stdout
        assert kernel.poll() is None
    finally:
        kernel.kill()
        kernel.wait()
