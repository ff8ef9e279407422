"""The notebook surface: Cluster and Pool, a real kernel that gets SIGKILLed, the jupyter-server status page
in a real server and a real headless browser (Debian's chromium), and the example notebooks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from provisioner.errors import HearthError
from provisioner.supervisor import read_state
from browser import CHROMIUM, FLAGS
from leaks import token_leaks
from test_engine import processes_mentioning

pytestmark = pytest.mark.slow

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
        assert "2 ready" in html and "Ray head: up" in html and html.count('class="r" title="verbs-') == 2  # a timeline row per node
        table = cluster.nodes._repr_html_()  # a table, phases named for the local backend
        assert "<th>first output</th>" in table and table.count("<td>ready</td>") == 2
        from provisioner.view import summary_html

        live = "".join(summary_html(cluster._run.summary(), base_url="/user/me/", view=view) for view in ("live", "saved"))
        assert token_leaks(cluster._run.head.token, dirs=(run_dir, Path(isolated["HEARTH_STATE_DIR"])), texts={
            "view's HTML": html + live, "nodes table": table + repr(cluster.nodes), "repr": repr(cluster)}) == []
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


def test_rerun_closes_the_same_name_and_ray_follows_the_cluster_in_use(isolated, run_dir, capsys):
    """Clusters of no nodes (a Ray head each): names, run directories, tokens and the kernel's Ray connection."""
    import ray

    from provisioner import Cluster
    from provisioner.errors import SpecError

    from provisioner.supervisor import state_root

    state = state_root()  # made as hearth makes it: this user's alone (userdirs.py)
    (state / "taken").mkdir(mode=0o700)
    (state / "taken" / "state.json").write_text(json.dumps({"pid": 1, "status": "ready"}))  # pid 1 lives
    with pytest.raises(SpecError, match="running in another process .pid 1"):
        Cluster(nodes=0, name="taken", show=False)
    assert not (run_dir / "taken").exists()  # refused before anything started

    first = Cluster(nodes=0, name="again", show=False).wait()
    assert ray.get_runtime_context().gcs_address.endswith(f":{first._run.head.gcs_port}")
    token = state / "again" / "token"
    assert token.read_text() == first._run.head.token and token.stat().st_mode & 0o777 == 0o600
    assert first._run.head.token not in (state / "again" / "state.json").read_text()
    second = Cluster(nodes=0, name="again", show=False)  # the cell, run again
    assert capsys.readouterr().out.count("closing cluster again") == 1
    assert first.status == "stopped" and not ray.is_initialized()  # its connection went with it
    second.wait()
    heads = [p for p in processes_mentioning(str(run_dir)) if "--head" in p]
    assert len(heads) == 1 and f"--port={second._run.head.gcs_port}" in heads[0]  # only the new cluster's head
    assert ray.get_runtime_context().gcs_address.endswith(f":{second._run.head.gcs_port}")

    other = Cluster(nodes=0, show=False).wait()  # no name: one of its own; Ray follows the cluster in use
    assert other.name not in ("again", "") and ray.get_runtime_context().gcs_address.endswith(f":{other._run.head.gcs_port}")
    second.wait()
    assert ray.get_runtime_context().gcs_address.endswith(f":{second._run.head.gcs_port}")
    assert ray.cluster_resources().get("CPU", 0) == 0  # a working connection, with this cluster's token
    other.close()  # not the one Ray is connected to: the connection stays
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address.endswith(f":{second._run.head.gcs_port}")
    second.close()
    assert not ray.is_initialized() and not token.exists() and processes_mentioning(str(run_dir)) == []
    with pytest.raises(HearthError, match="again is closed"):
        second.wait()


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


def test_kernel_interrupt_errors_and_kill(isolated, run_dir):
    """A real kernel: the display (HTML updated in place), Ctrl-C in wait() (one line; the boot goes on), an
    expected error without hearth's frames, and SIGKILL taking every node with it."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env={**os.environ, **isolated})
    client = manager.client()
    client.start_channels()
    state = Path(isolated["HEARTH_STATE_DIR"]) / "clusters" / "doomed"
    seen: list[dict] = []  # every IOPub message, whichever request it answers (the view updates from a thread)

    def run(code: str, timeout: float = 180) -> dict:
        msg_id = client.execute(code)
        deadline = time.monotonic() + timeout
        while not (seen and seen[-1]["parent_header"].get("msg_id") == msg_id
                   and seen[-1]["content"].get("execution_state") == "idle"):
            seen.append(client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1)))
        return client.get_shell_msg(timeout=30)["content"]

    try:
        client.wait_for_ready(timeout=60)
        assert run("from provisioner import Cluster\ncluster = Cluster(nodes=2, name='doomed')")["status"] == "ok"
        (display,) = [m["content"] for m in seen if m["msg_type"] == "display_data"]
        assert set(display["data"]) == {"text/html", "text/plain"}  # no widget: saved, it still shows
        assert "hearth cluster doomed" in display["data"]["text/html"]

        waiting = client.execute("cluster.wait()")
        # ipykernel ignores SIGINT between requests: interrupt only once this one runs (its input was published)
        while not any(m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == waiting for m in seen):
            seen.append(client.get_iopub_msg(timeout=30))
        while (read_state(state) or {}).get("status") != "booting":
            time.sleep(0.1)
        manager.interrupt_kernel()  # the head alone takes seconds to start: this lands while wait() waits
        reply = client.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == waiting and reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "Interrupted"
        (line,) = reply["content"]["traceback"]  # one line, not the frames of concurrent.futures and threading
        assert "cluster doomed keeps booting" in line and "cluster.close() stops it" in line

        assert run("cluster.wait()\nprint('READY', cluster.status)")["status"] == "ok"
        assert any("READY ready" in m["content"].get("text", "") for m in seen)  # it kept booting
        updates = [m["content"] for m in seen if m["msg_type"] == "update_display_data"]
        assert updates and {u["transient"]["display_id"] for u in updates} == {display["transient"]["display_id"]}
        assert "ready (Ray head" in updates[-1]["data"]["text/html"]  # the one view, updated in place

        reply = run("Cluster(nodes=-1)", timeout=60)
        assert reply["ename"] == "SpecError"
        (line,) = reply["traceback"]
        assert "nodes: ask for 0 to 1024 nodes" in line

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


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """One request, redirects not followed: (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.requires("chromium")
def test_status_page_and_dashboard_through_jupyter_server(isolated, run_dir, tmp_path):
    """A `hearth up` cluster seen through a real Jupyter server: the status page (JSON, and in chromium), and
    the cluster's Ray dashboard proxied with its token added by the server, behind Jupyter's own login."""
    name = "dashboard"  # the proxy finds the path after the cluster's prefix, not after the first "/dashboard/"
    port, token = _free_port(), "hearth-test-token"
    env = {**os.environ, **isolated}
    hearth = str(Path(sys.executable).with_name("hearth"))
    up = subprocess.run([hearth, "up", "--nodes", "1", "--name", name], capture_output=True, text=True,
                        timeout=180, env=env)
    assert up.returncode == 0, up.stderr
    server = subprocess.Popen([str(Path(sys.executable).with_name("jupyter")), "server", "--no-browser",
                               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
                               "--allow-root"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"token {token}"}
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
        assert cluster["name"] == name and cluster["nodes"][0]["state"] == "ready"
        ray_token = (Path(isolated["HEARTH_STATE_DIR"]) / "clusters" / name / "token").read_text()
        assert ray_token not in json.dumps(data)
        assert data["hosts"][0]["gpu_host"] is False and data["hosts"][0]["vfio"]["host"][0]["check"] == "iommu"

        dashboard = f"{base}/hearth/clusters/{name}/dashboard/"
        status, headers, body = _get(dashboard, auth)
        assert status == 200 and b"<title>Ray Dashboard</title>" in body  # Ray's single-page app
        status, headers, body = _get(dashboard + "api/v0/nodes?limit=10", auth)  # an API that needs Ray's token
        assert status == 200 and json.loads(body)["data"]["result"]["total"] == 2
        assert _get(cluster["ray"]["dashboard"] + "/api/v0/nodes?limit=10")[0] == 401  # Ray itself: no token, no answer
        assert _get(dashboard + "api/authentication_mode", auth)[2] == b'{"authentication_mode": "token"}'
        for status, headers, body in (_get(dashboard, auth), _get(dashboard + "api/version", auth)):
            assert ray_token.encode() not in body and "ray-authentication-token" not in str(headers).lower()
        status, headers, body = _get(dashboard)  # no Jupyter login: to the login page, nothing of Ray's
        assert status in (302, 403) and b"Ray Dashboard" not in body
        assert status == 403 or "/login" in headers["Location"]
        assert _get(f"{dashboard}api/jobs/", {**auth, "Content-Type": "application/json"}, method="POST")[0] in (403, 405)
        assert _get(f"{base}/hearth/clusters/nosuch/dashboard/", auth)[0] == 404
        assert _get(f"{base}/hearth/clusters/{name}/dashboard", auth)[1]["Location"].endswith(f"/{name}/dashboard/")

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        browser = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000"]
        dom = subprocess.run([*browser, "--dump-dom", f"{base}/hearth/?token={token}"], capture_output=True,
                             text=True, timeout=120)
        assert f"hearth cluster {name}" in dom.stdout and f"{name}-0" in dom.stdout and "not a GPU host" in dom.stdout
        assert f"/hearth/clusters/{name}/dashboard/" in dom.stdout  # the page links each running cluster's dashboard
        assert "<details><summary>VFIO report for admins</summary>" in dom.stdout and "IOMMU" in dom.stdout
        subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,900", f"{base}/hearth/?token={token}"],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000
        assert token_leaks(ray_token, dirs=(run_dir, Path(isolated["HEARTH_STATE_DIR"])), texts={
            "status page": dom.stdout, "status page's JSON": json.dumps(data)}) == []
        fresh = [a if not a.startswith("--user-data-dir") else f"--user-data-dir={tmp_path / 'fresh'}" for a in browser]
        login = subprocess.run([*fresh, "--dump-dom", f"{base}/hearth/"], capture_output=True, text=True, timeout=120)
        assert f"hearth cluster {name}" not in login.stdout  # a browser without the token's cookie: no page
    finally:
        server.terminate()
        server.wait(30)
        subprocess.run([hearth, "down", "--name", name], capture_output=True, timeout=120, env=env)
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
