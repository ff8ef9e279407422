"""The notebook surface: Cluster and Pool, a real kernel that gets SIGKILLed, the jupyter-server status page
in a real server and a real headless browser (Debian's chromium), and the example notebooks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_engine import processes_mentioning

ROOT = Path(__file__).parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def isolated(tmp_path, run_dir, monkeypatch):
    """State and run directories of this test's own, for this process and the ones it starts."""
    env = {"HEARTH_STATE_DIR": str(tmp_path / "state"), "HEARTH_RUN_DIR": str(run_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_cluster_and_pool_verbs(isolated, run_dir):
    import ray

    from provisioner import Cluster, Pool

    with Cluster(nodes=2, name="verbs", show=False, labels={"team": "nb"}) as cluster:
        assert cluster.status == "ready" and ray.is_initialized()
        labels = ray.get([ray.remote(lambda: ray.get_runtime_context().get_node_labels()).options(
            label_selector={"hearth.io/node": n["id"]}).remote() for n in cluster.nodes])
        assert [(l["hearth.io/node"], l["team"]) for l in labels] == [("verbs-0", "nb"), ("verbs-1", "nb")]
        assert all(set(n["profile"]) >= {"guest_up", "ray_joined", "ready", "total"} for n in cluster.nodes)
        assert "Ray runtime started" in cluster.logs("verbs-0")
        html = cluster._repr_html_()
        assert "2 ready" in html and "Ray dashboard" in html and html.count("border-radius:3px") == 2
        assert cluster.scale(3).nodes[-1]["state"] == "ready" and len(cluster.nodes) == 3
        assert [n["id"] for n in cluster.scale(1).nodes] == ["verbs-0"]
        job = cluster.submit_job("python -c \"print('job ok')\"")
        client = cluster.job_client()
        for _ in range(120):
            if client.get_job_status(job).value in ("SUCCEEDED", "FAILED"):
                break
            time.sleep(0.5)
        assert client.get_job_status(job).value == "SUCCEEDED" and "job ok" in client.get_job_logs(job)
    assert not ray.is_initialized() and processes_mentioning(str(run_dir)) == []

    def square(x):
        if x == 3:
            raise ValueError("three is bad")
        return x * x

    with Pool(min=0, max=2, idle_shutdown_after=2, name="pool") as pool:
        assert pool.nodes == []  # min=0: nothing booted until a call needs it
        assert pool.call(square, 4) == 16 and len(pool.nodes) == 1
        assert pool.map(square, [1, 2, 5, 6]) == [1, 4, 25, 36] and len(pool.nodes) <= 2
        with pytest.raises(ValueError, match="three is bad"):
            pool.call(square, 3)
        for _ in range(40):
            if not pool.nodes:
                break
            time.sleep(0.25)
        assert pool.nodes == []  # idle nodes were shut down: scale to zero
        assert pool.call(square, 7) == 49  # and it grows again
    assert processes_mentioning(str(run_dir)) == []


def test_adapt_scales_to_zero_when_idle_and_back_with_work(isolated, run_dir):
    import ray

    from provisioner import Cluster

    with Cluster(nodes=1, name="adapt", show=False) as cluster:
        cluster.adapt(minimum=0, maximum=2, idle_shutdown_after=2)
        for _ in range(60):
            if not cluster.nodes:
                break
            time.sleep(0.5)
        assert cluster.nodes == []  # idle for 2 s: scaled to zero
        work = ray.remote(num_cpus=1)(lambda x: (time.sleep(1), x)[1])
        assert ray.get([work.remote(i) for i in range(2)], timeout=120) == [0, 1]
        assert 1 <= len(cluster.nodes) <= 2  # waiting tasks brought nodes back, within the maximum
    assert processes_mentioning(str(run_dir)) == []


def test_killed_kernel_takes_its_nodes_with_it(isolated, run_dir):
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env={**os.environ, **isolated})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(
            "from provisioner import Cluster\ncluster = Cluster(nodes=2, name='doomed')\ncluster.wait()\n"
            "print('READY', cluster.status)", timeout=180, output_hook=(outputs := []).append)
        assert reply["content"]["status"] == "ok"
        messages = [m["content"] for m in outputs]
        assert any("application/vnd.jupyter.widget-view+json" in m.get("data", {}) for m in messages)
        assert any("READY ready" in m.get("text", "") for m in messages)
        running = processes_mentioning(str(run_dir))
        assert len(running) >= 3  # the head and two nodes, at least
        os.kill(manager.provisioner.process.pid, signal.SIGKILL)  # no cleanup code runs in the kernel
        started = time.monotonic()
        while processes_mentioning(str(run_dir)) and time.monotonic() - started < 30:
            time.sleep(0.5)
        assert processes_mentioning(str(run_dir)) == [], f"still running {time.monotonic() - started:.0f} s after the kill"
    finally:
        client.stop_channels()
        manager.cleanup_resources()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (scripts/test installs it when run as root)")
def test_status_page_in_jupyter_server_and_chromium(isolated, run_dir, tmp_path):
    port, token = _free_port(), "hearth-test-token"
    env = {**os.environ, **isolated}
    hearth = str(Path(sys.executable).with_name("hearth"))
    up = subprocess.run([hearth, "up", "--nodes", "1", "--name", "page"], capture_output=True, text=True,
                        timeout=180, env=env)
    assert up.returncode == 0, up.stderr
    server = subprocess.Popen([str(Path(sys.executable).with_name("jupyter")), "server", "--no-browser",
                               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
                               "--allow-root"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/hearth/api/clusters", timeout=10)
        assert denied.value.code == 403
        data = json.load(urllib.request.urlopen(f"{base}/hearth/api/clusters?token={token}", timeout=30))
        (cluster,) = data["clusters"]
        assert cluster["name"] == "page" and cluster["nodes"][0]["state"] == "ready"
        assert "token" not in json.dumps(cluster).lower().replace("hearth-test-token", "")
        assert data["hosts"][0]["vfio"]["host"][0]["check"] == "iommu"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "hearth-status-page.png"
        shot.unlink(missing_ok=True)
        browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000"]
        dom = subprocess.run([*browser, "--dump-dom", f"{base}/hearth/?token={token}"], capture_output=True,
                             text=True, timeout=120)
        assert "hearth cluster page" in dom.stdout and "page-0" in dom.stdout and "IOMMU" in dom.stdout
        subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,900", f"{base}/hearth/?token={token}"],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000
        fresh = [a if not a.startswith("--user-data-dir") else f"--user-data-dir={tmp_path / 'fresh'}" for a in browser]
        login = subprocess.run([*fresh, "--dump-dom", f"{base}/hearth/"], capture_output=True, text=True, timeout=120)
        assert "hearth cluster page" not in login.stdout  # a browser without the token's cookie: no page
    finally:
        server.terminate()
        server.wait(30)
        subprocess.run([hearth, "down", "--name", "page"], capture_output=True, timeout=120, env=env)
    assert processes_mentioning(str(run_dir)) == []


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_example_notebooks_run(notebook, isolated, run_dir):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    os.environ["HEARTH_SWEEP_SCALE"] = "ci"  # the sweep's one parameter: local backend, a few nodes
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.pop("HEARTH_SWEEP_SCALE")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    assert processes_mentioning(str(run_dir)) == []
