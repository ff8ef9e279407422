"""`hearth bench boot` at small N, every path of it: figures are printed, not judged here (timings on a shared
machine are not a test), but they must be consistent: what must be at least 1 is, solo boots are reused by seed,
requests add up, the JSON has the keys the issue lists. Also the pieces the bench stands on: the stand-in's
bench mode, the launcher local nodes fork from, and the boot timeline the notebook, the status page and the
plot draw."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from provisioner.ch.standin import boot_delay
from provisioner.timeline import rows, timeline_html
from provisioner.view import summary_html

HEARTH = str(Path(sys.executable).with_name("hearth"))
KEYS = ("cluster_ready_s", "solo_slowest_s", "ratio_to_solo", "controller_ms_per_node", "agent_ms_per_node",
        "agent_requests_per_node")


def test_bench_boot_every_path_small(tmp_path, request):
    """One host (4 nodes), 3 hosts (6 nodes, one through the loopback sshd), 1 local Ray node each way, a plot."""
    started = time.monotonic()
    plot = tmp_path / "boot.png"
    out = subprocess.run([HEARTH, "bench", "boot", "--hosts", "3", "--nodes", "6", "--one-host-nodes", "4",
                          "--ssh-every", "3", "--median", "0.3", "--solo-top", "0", "--local-nodes", "1",
                          "--plot", str(plot), "--json"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout)
    took = time.monotonic() - started
    for run in ("parallel", "hosts"):
        p = figures[run]
        assert all(key in p for key in KEYS), sorted(p)
        draws = {i: boot_delay({"boot_s": {"median": 0.3, "sigma": 0.25, "straggler_p": 0.05, "straggler_x": 2.5},
                                "seed": i}) for i in range(p["nodes"])}
        assert p["solo_measured"] == p["nodes"]  # --solo-top 0: every node alone
        # what cannot be otherwise: no boot is faster than its drawn VM boot, alone or in parallel, and the
        # cluster is ready no sooner than its slowest node, placed to ready
        assert p["cluster_ready_s"] >= max(draws.values()) and p["cluster_ready_s"] >= p["placed_to_ready_max_s"]
        assert all(float(solo) >= draws[int(i)] for i, solo in p["solo_s"].items())
        assert p["solo_slowest_s"] == max(p["solo_s"].values())
        # the ratio is of the unrounded times, the times shown rounded to 1 ms: allow what that rounding moves it
        ratio, cluster, solo = p["cluster_ready_s"] / p["solo_slowest_s"], p["cluster_ready_s"], p["solo_slowest_s"]
        assert p["ratio_to_solo"] == pytest.approx(ratio, abs=0.0005 + ratio * (0.0005 / cluster + 0.0005 / solo))
        requests = {k: v["count"] for k, v in p["agent_requests"].items()}
        assert requests["PUT /v1/vms/{id}"] == requests["DELETE /v1/vms/{id}"] == p["nodes"]
        assert requests["GET /v1/info"] == requests["GET /v1/gpus"] == p["hosts"]
        assert p["agent_requests_per_node"] <= p["agent_requests_per_node_total"]
        assert p["cpu_s"]["controller"] > 0 and p["cpu_s"]["agents"] > 0 and p["cpu_s"]["standins"] > 0
    assert figures["hosts"]["ssh_hosts"] == 1 and figures["hosts"]["sshd_ms_per_node"] >= 0  # CPU ticks are 10 ms
    assert figures["parallel"]["ssh_hosts"] == 0
    # node i has seed i in both runs: the 4 seeds the one-host run measured alone are not booted alone again
    assert figures["hosts"]["solo_reused"] == 4 and figures["solo_boots"] == {"measured": 6, "distinct_seeds": 6}
    local = figures["local"]
    assert local["hearth_parallel"]["launcher"] and local["ratio_to_ray"] == pytest.approx(
        local["hearth_parallel"]["joined_s"] / local["ray_parallel"]["joined_s"], abs=0.002)
    assert {"ray_sequential", "hearth_sequential", "ratio_to_ray_sequential"} <= set(local)
    assert len(figures["load_average"]["start"]) == 3 and figures["standins"] == "forked from a zygote"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nbench boot, small: {took:.0f} s; one host {figures['parallel']['ratio_to_solo']}, 3 hosts "
              f"{figures['hosts']['ratio_to_solo']}, local {local['ratio_to_ray']} (load {os.getloadavg()[0]:.1f})")


def test_bench_boot_with_an_interpreter_per_standin():
    """--no-fork-standins: each stand-in VMM its own `python -IS`, the way before the zygote; one boot slot."""
    out = subprocess.run([HEARTH, "bench", "boot", "--nodes", "3", "--median", "0.2", "--solo-top", "1",
                          "--max-concurrent-boots", "1", "--local-nodes", "0", "--no-fork-standins", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout)
    assert figures["standins"].startswith("an interpreter each") and figures["parallel"]["standin_ms_per_node"] > 0
    assert figures["parallel"]["cluster_ready_s"] >= figures["parallel"]["slowest_draw_s"]
    assert figures["parallel"]["slot_wait_s"]["max"] > 0  # one boot slot: the others waited for it


def test_cpu_of_counts_a_live_process_under_one_clock_tick():
    """A live child that used less than a clock tick (a forked stand-in VMM at boot) still counts: /proc's stat
    alone reads it as 0 CPU, which made the stand-ins' boot CPU 0 in a CI run."""
    from provisioner.bench.cpu import cpu_of

    child = subprocess.Popen(["sleep", "30"])  # returns once `sleep` runs: a few ms of CPU, then none
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(stat[11]) + int(stat[12])
        cpu = cpu_of([os.getpid(), child.pid])  # one snapshot
        own = cpu[child.pid].own
        assert 0 < own < 1 and ticks / os.sysconf("SC_CLK_TCK") <= own
        assert cpu[os.getpid()].children >= own  # the parent's descendants include it
    finally:
        child.kill()
        child.wait()


def test_plot_names_the_extra_when_matplotlib_is_missing(tmp_path):
    blocker = tmp_path / "sitecustomize.py"  # makes `import matplotlib` fail in that process only
    blocker.write_text("import sys\nsys.modules['matplotlib'] = None\n")
    out = subprocess.run([HEARTH, "bench", "boot", "--nodes", "1", "--local-nodes", "0", "--plot", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0 and "pip install 'hearth[plot]'" in out.stderr


def test_standin_bench_mode_skips_validation_only(run_dir):
    """The same API and states without the schema: an off-spec body passes in bench mode, and is refused by default."""
    standin = str(Path(sys.executable).with_name("cloud-hypervisor-standin"))

    def create(settings: dict) -> int:
        socket = run_dir / f"api-{len(settings)}.sock"
        vmm = subprocess.Popen([standin, "--api-socket", f"path={socket}"], stderr=subprocess.DEVNULL,
                               env={**os.environ, "HEARTH_STANDIN": json.dumps(settings)})
        try:
            deadline = time.monotonic() + 20
            while not socket.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://localhost/api/v1") as c:
                assert c.get("/vmm.ping").json()["version"] == "v53.0"
                status = c.put("/vm.create", json={"payload": {"kernel": "/k"}, "no_such_field": 1}).status_code
                assert c.get("/vm.info").status_code == (200 if status == 204 else 404)
                assert c.put("/vm.nothing").status_code == 404
                return status
        finally:
            vmm.kill()
            vmm.wait()

    assert create({}) == 400 and create({"validate": False}) == 204


def test_launcher_forks_commands_with_their_env_session_and_status(tmp_path):
    from provisioner.launcher import Launcher
    from provisioner.processes import terminate
    from provisioner.ray_head import local_env

    async def scenario():
        launcher = Launcher()
        await launcher.start(local_env())
        try:
            code = "import os, sys; print(sys.argv[1:], os.environ['WHO'], os.getsid(0) == os.getpid()); sys.exit(3)"
            child = await launcher.launch([sys.executable, "-c", code, "a"], {**os.environ, "WHO": "node"},
                                          tmp_path / "out")
            said = [line async for line in child.stdout]
            status = await child.wait()
            sleeper = await launcher.launch([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                            tmp_path / "out2")
            ended = await terminate(sleeper, 0)
            with pytest.raises(ValueError, match="python -c"):
                await launcher.launch(["ray", "start"], {}, tmp_path / "out3")
            return said, status, ended, sleeper.returncode
        finally:
            await launcher.close()

    said, status, ended, killed = asyncio.run(scenario())
    assert said == [b"['a'] node True\n"] and status == 3 and ended and killed < 0


def _summary(now: float) -> dict:
    """A cluster 10 s after `Cluster(...)`: the head took 3 s, one node ready, one booting, one failed."""
    t = now - 10

    def node(name: str, states: list[tuple[str, float]], state: str, detail: str | None = None) -> dict:
        return {"id": name, "host": "h0", "state": state, "detail": detail, "errors": [], "attempts": 1,
                "profile": {}, "events": [{"state": s, "at": t + at, "detail": None} for s, at in states]}

    boot = [("requested", 3), ("placed", 3), ("vmm_started", 4), ("booting", 4.5), ("guest_up", 6)]
    return {"name": "tl", "backend": "cloud-hypervisor", "status": "booting", "error": None, "created_at": t,
            "started_at": t + 3, "ready_at": None, "ended_at": None, "head": {"starting": t, "up": t + 3},
            "nodes": [node("tl-0", boot + [("ray_joined", 7), ("ready", 7.2)], "ready"),
                      node("tl-1", boot, "guest_up"),
                      node("tl-2", boot[:3] + [("failed", 5)], "failed", "vm.boot answered 500")]}


def test_timeline_rows_name_each_phase_by_the_state_it_ends_in():
    now = 1_000_000.0
    origin, span, found = rows(_summary(now), now)
    assert [r.name for r in found] == ["Ray head", "tl-0", "tl-1", "tl-2"]
    head, ready, booting, failed = found
    assert [(b.phase, b.start, b.end) for b in head.bars] == [("head", 0, 3)]
    assert [b.phase for b in ready.bars] == ["placed", "vmm_started", "booting", "guest_up", "ray_joined", "ready"]
    assert ready.bars[-1].end == pytest.approx(7.2) and not any(b.running for b in ready.bars)
    assert booting.bars[-1].phase == "ray_joined" and booting.bars[-1].running and booting.bars[-1].end == pytest.approx(10)
    assert failed.failed_at == pytest.approx(5) and failed.bars[-1].phase == "vmm_started"
    assert span == pytest.approx(10)
    page = summary_html(_summary(now), now=now, view="page")
    assert page.count('class="r"') == 5 and "Ray head" in page and "tl-2 on h0: failed" in page  # 4 rows, the axis
    many = _summary(now)
    many["nodes"] = many["nodes"] * 20
    assert 'class="n">tl-0' not in timeline_html(many, now)  # 60 nodes: thin rows, names on hover only
