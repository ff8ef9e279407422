"""The quickstart as a person runs it: JupyterLab in Debian's chromium, driven through its UI by Playwright.

One walk through the notebook, each step checked and photographed under test-artifacts/jupyterlab/:
run the `Cluster(...)` cell (the view appears, the Ray head's start shows as a phase, the cluster becomes
ready); open the Ray dashboard from the view's link (it loads through Jupyter with no token prompt, and not
at all without Jupyter's login); run the cell again (the old cluster is closed, one cluster's processes
remain) and interrupt `wait()` (one line; the boot goes on, as documented in cluster.py); restart the kernel
(every process ends, the view says the kernel is gone); save and reload (the saved view shows, not an error).
The measured times go to test-artifacts/jupyterlab/timings.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import CHROMIUM, FLAGS, need
from provisioner.supervisor import read_state
from provisioner.view import STALE_AFTER
from test_engine import processes_mentioning

pytestmark = [pytest.mark.slow, pytest.mark.requires("chromium")]

ROOT = Path(__file__).parents[1]
SHOTS = ROOT / "test-artifacts" / "jupyterlab"
NOTEBOOK = "01-quickstart.ipynb"
BOOT_S = 240  # a two-node local cluster on a busy two-core machine, with one retry


@pytest.fixture
def lab(tmp_path, run_dir):
    """JupyterLab on loopback with a token, serving a copy of the quickstart; its own state, run, config and
    data directories, and no news or update checks (nothing here reaches the internet)."""
    need("jupyterlab", "playwright")  # Python modules (the test extra); chromium: the mark above
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root)
    settings = tmp_path / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "HEARTH_STATE_DIR": str(tmp_path / "state"), "HEARTH_RUN_DIR": str(run_dir),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython")}
    port, token = _free_port(), "hearth-lab-token"
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("jupyter-lab")), "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "lab.log").read_text()
            time.sleep(0.25)
    yield {"base": base, "token": token, "root": root, "state": tmp_path / "state" / "clusters", "tmp": tmp_path}
    server.terminate()
    server.wait(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "lab.log", SHOTS / "lab.log")


def test_quickstart_in_jupyterlab(lab, run_dir):
    from playwright.sync_api import sync_playwright

    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    times: dict[str, float] = {}
    started = time.monotonic()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(lab["tmp"] / "chromium"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        try:
            _walk(page, context, playwright, lab, run_dir, times)
        except BaseException:
            page.screenshot(path=SHOTS / "failed-here.png", full_page=True)
            raise
        finally:
            times["test_total_s"] = round(time.monotonic() - started, 1)
            (SHOTS / "timings.json").write_text(json.dumps(times, indent=1))
            print("jupyterlab timings:", json.dumps(times))
            context.close()


def _walk(page, context, playwright, lab, run_dir, times) -> None:
    base, token = lab["base"], lab["token"]
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.wait_for_function("document.querySelectorAll('.jp-Notebook .jp-Cell').length >= 5", timeout=120_000)
    kernel_idle(page)
    shot(page, "01-notebook-open")
    cells = page.locator(".jp-Notebook .jp-Cell")
    cluster_cell, wait_cell = cells.nth(1), cells.nth(2)

    # Shift+Enter on the Cluster(...) cell: the view appears, the head's start is a phase, then it is ready.
    run_cell(page, cluster_cell)
    pressed = time.monotonic()
    view = cluster_cell.locator(".hearth-cluster")
    view.wait_for(timeout=60_000)
    times["shift_enter_to_view_s"] = round(time.monotonic() - pressed, 2)
    head = cluster_cell.locator(".hearth-head")
    until(lambda: "starting the Ray head" in head.inner_text() or "up (started in" in head.inner_text(), 60)
    assert "starting the Ray head" in head.inner_text(), head.inner_text()  # seen while it starts, not after
    shot(page, "02-starting-the-ray-head")
    page.keyboard.press("Shift+Enter")  # the next cell: cluster.wait(), then a Ray call on every node
    status = cluster_cell.locator(".hearth-status")
    until(lambda: status.inner_text().startswith(("ready", "failed")), BOOT_S)
    times["shift_enter_to_ready_s"] = round(time.monotonic() - pressed, 2)
    assert status.inner_text().startswith("ready (Ray head"), view.inner_text()
    until(lambda: "quickstart-1" in wait_cell.locator(".jp-OutputArea").inner_text(), 60)
    assert "['quickstart-0', 'quickstart-1']" in wait_cell.locator(".jp-OutputArea").inner_text()
    counts = cluster_cell.locator(".hearth-counts").inner_text()
    assert counts.startswith("2 ready") and "of 2 nodes" in counts, counts
    shot(page, "03-ready")

    # The dashboard link: Ray's app through Jupyter, no token prompt; nothing of it without Jupyter's login.
    link = cluster_cell.get_by_role("link", name="Ray dashboard")
    href = link.get_attribute("href")
    assert href == "/hearth/clusters/quickstart/dashboard/"
    dashboard = context.new_page()
    dashboard.goto(base + href)
    dashboard.get_by_text("Recent jobs").wait_for(timeout=60_000)  # drawn from APIs that need Ray's token
    dashboard.wait_for_timeout(1000)
    assert dashboard.get_by_text("Authentication Token Required").count() == 0
    ray_token = (lab["state"] / "quickstart" / "token").read_text()
    assert all(c["name"] != "ray-authentication-token" and ray_token not in c["value"] for c in context.cookies())
    shot(dashboard, "04-ray-dashboard-through-jupyter")
    dashboard.close()
    stranger = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    try:
        anonymous = stranger.new_page()
        anonymous.goto(base + href)
        assert "/login" in anonymous.url and anonymous.title() != "Ray Dashboard"
        assert anonymous.locator("input[type=password]").count() >= 1  # Jupyter's login form, nothing of Ray's
        shot(anonymous, "05-dashboard-without-jupyter-login")
    finally:
        stranger.close()

    # The Cluster(...) cell again: the old cluster is closed first; then Ctrl-C (Kernel > Interrupt) in wait().
    old_head = read_state(lab["state"] / "quickstart")["ray"]["address"]
    run_cell(page, cluster_cell)
    until(lambda: "closing cluster quickstart" in cluster_cell.locator(".jp-OutputArea").inner_text(), 120)
    page.keyboard.press("Shift+Enter")  # wait(), queued behind the Cluster(...) cell
    until(lambda: prompt(cluster_cell) != "[*]:" and prompt(wait_cell) == "[*]:"
          and (read_state(lab["state"] / "quickstart") or {}).get("status") == "booting", 120)
    page.keyboard.press("Escape")
    page.keyboard.press("i")
    page.keyboard.press("i")
    until(lambda: "KeyboardInterrupt" in wait_cell.locator(".jp-OutputArea").inner_text(), 60)
    said = wait_cell.locator(".jp-OutputArea").inner_text().strip()
    assert said.startswith("KeyboardInterrupt: wait() interrupted; cluster quickstart keeps booting"), said
    assert "Traceback" not in said and said.count("\n") == 0  # one line
    shot(page, "06-wait-interrupted-the-boot-goes-on")
    until(lambda: status.inner_text().startswith(("ready", "failed")), BOOT_S)  # it kept booting
    assert status.inner_text().startswith("ready (Ray head"), view.inner_text()
    run_cell(page, wait_cell)
    until(lambda: "quickstart-1" in wait_cell.locator(".jp-OutputArea").inner_text(), 120)
    running = processes_mentioning(str(run_dir))
    heads = [p for p in running if "--head" in p]
    assert len(heads) == 1 and old_head.split(":")[1] not in heads[0], running  # one cluster, the new one
    # and its two nodes: a raylet each, and the head's (local nodes fork from the launcher, whose command line is theirs)
    assert len([p for p in running if "/raylet/raylet " in p]) == 3, running
    shot(page, "07-rerun-one-cluster-left")

    # Restart the kernel (Kernel > Restart, confirmed): every process ends; the view says the kernel is gone.
    page.keyboard.press("Escape")
    page.keyboard.press("0")
    page.keyboard.press("0")
    page.locator(".jp-Dialog button.jp-mod-accept").click()
    restarted = time.monotonic()
    until(lambda: not processes_mentioning(str(run_dir)), 30)
    times["restart_to_no_processes_s"] = round(time.monotonic() - restarted, 2)
    stale = cluster_cell.locator(".hearth-stale")
    until(stale.is_visible, STALE_AFTER + 30)
    times["restart_to_stale_notice_s"] = round(time.monotonic() - restarted, 2)
    assert "No word from the kernel" in stale.inner_text()
    assert not cluster_cell.get_by_role("link", name="Ray dashboard").is_visible()  # its head went with the kernel
    shot(page, "08-kernel-restarted-view-says-so")

    # Save, reload: the saved view shows (the last state, and that it is stale), not an error.
    kernel_idle(page)
    page.keyboard.press("Control+s")
    until(lambda: "hearth cluster quickstart" in (lab["root"] / NOTEBOOK).read_text(), 30)
    page.reload()
    page.wait_for_function("document.querySelectorAll('.jp-Notebook .jp-Cell').length >= 5", timeout=120_000)
    cluster_cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cluster_cell.locator(".hearth-cluster").wait_for(timeout=60_000)
    assert "hearth cluster quickstart" in cluster_cell.inner_text()
    assert page.get_by_text("Error displaying widget").count() == 0
    shot(page, "09-saved-and-reloaded")


def run_cell(page, cell) -> None:
    """Put the cursor in a cell's editor and press Shift+Enter, as a person does."""
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def prompt(cell) -> str:
    return cell.locator(".jp-InputPrompt").first.inner_text().strip()


def kernel_idle(page) -> None:
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)


def shot(page, name: str) -> None:
    page.screenshot(path=SHOTS / f"{name}.png")


def until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s"
        time.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
