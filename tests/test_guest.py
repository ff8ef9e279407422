"""The guest side for real: `hearth guest build`, the guest agent, and the qemu backend booting real VMs that
join a real Ray head. QEMU runs under TCG (software emulation) here: this machine's /dev/kvm runs only
para-virtualised guests. The image is built from Debian packages and PyPI: in CI (CI=true) from scratch on
every run, elsewhere into HEARTH_TEST_IMAGE (default /var/cache/hearth/test-guest-image), reused while its
inputs are unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HEARTH, QEMU_GATEWAY as GATEWAY, QEMU_SUBNET as SUBNET, QEMU_TAPS, say as _say
from provisioner.run import ClusterRun
from provisioner.errors import HearthError, SpecError
from provisioner.spec import cluster_spec
from provisioner.hosts import Host, HostNetwork, Inventory

pytestmark = [pytest.mark.slow, pytest.mark.root("images, taps and bridges need root")]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _qemus(marker: str) -> list[int]:
    """QEMU processes whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"qemu-system-x86_64") and marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _taps() -> set[str]:
    return {line.split()[0].split("@")[0] for line in _ip("-br", "link").stdout.splitlines() if line.startswith(QEMU_TAPS)}


@pytest.fixture(scope="module")
def image(guest_image):
    return guest_image


@pytest.fixture(scope="module")
def bridge(qemu_bridge):
    return qemu_bridge


def _inventory(bridge: str, head_host: str = GATEWAY, subnet: str | None = SUBNET) -> Inventory:
    return Inventory(hosts=[Host(name="local", network=HostNetwork(bridge=bridge, subnet=subnet))], head_host=head_host)


def test_image_holds_the_controllers_ray_and_the_guest_agent(image):
    manifest = json.loads((image / "manifest.json").read_text())
    from importlib.metadata import version

    assert manifest["inputs"]["ray"] == version("ray")
    assert (image / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage, for direct kernel boot
    listing = subprocess.run(["debugfs", "-R", "ls -l /opt/hearth/venv/lib/python3.11/site-packages", str(image / "rootfs.img")],
                             capture_output=True, text=True).stdout
    assert f"ray-{version('ray')}.dist-info" in listing
    agent = subprocess.run(["debugfs", "-R", "cat /opt/hearth/guest/agent.py", str(image / "rootfs.img")],
                           capture_output=True).stdout
    assert agent == (Path(__file__).parents[1] / "guest/agent.py").read_bytes()


def test_bad_requests_are_refused_before_anything_starts(tmp_path, run_dir, bridge, image):
    spec = cluster_spec(nodes=1, backend="qemu", image=image, name="bad")
    cases = [
        (_inventory("hbrnone"), "bridge hbrnone is missing: ip link add hbrnone type bridge"),
        (_inventory(bridge, subnet="10.99.0.0/24"), f"bridge {bridge} has no address in 10.99.0.0/24"),
        (_inventory(bridge, subnet=None), "the qemu backend needs the host's network.subnet"),
        (_inventory(bridge, head_host="127.0.0.1"), f"set head_host: {GATEWAY} in the hosts file"),
    ]
    for inventory, message in cases:
        with pytest.raises(SpecError, match=message.replace(".", r"\.")):
            ClusterRun(spec, run_dir / "bad", inventory=inventory)
    with pytest.raises(SpecError, match="passes no GPUs through"):
        ClusterRun(cluster_spec(nodes=1, gpus_per_node=1, backend="qemu", image=image, name="bad"), run_dir / "bad",
                   inventory=_inventory(bridge))
    empty = tmp_path / "empty-image"
    empty.mkdir()
    run = ClusterRun(cluster_spec(nodes=1, backend="qemu", image=empty, name="bad"), run_dir / "bad",
                     inventory=_inventory(bridge), with_ray=False)
    with pytest.raises(HearthError, match="lacks vmlinuz: build it with `hearth guest build`"):
        asyncio.run(run.up())
    assert not _qemus(str(run_dir)) and not _taps()
    for args, message in [(["--nvidia-driver", "560"], "Debian ships NVIDIA's driver 535 (bookworm) and 550 (trixie)"),
                          (["--nvidia-driver", "550", "--nvidia-modules", "closed"], "'open' (Turing and newer"),
                          (["--nvidia-modules", "open"], "--nvidia-modules open needs --nvidia-driver")]:
        refused = subprocess.run([HEARTH, "guest", "build", "--out", str(tmp_path / "nv"), *args],
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        assert not (tmp_path / "nv").exists()


def test_a_vmm_that_fails_at_start_fails_the_node_and_leaves_nothing(tmp_path, run_dir, bridge, image):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vmlinuz").write_bytes(b"not a kernel")
    for name in ("initrd.img", "rootfs.img"):
        (broken / name).symlink_to(image / name)
    spec = cluster_spec(nodes=1, backend="qemu", image=broken, name="broken", boot_timeout=60)
    run = ClusterRun(spec, run_dir / "run", inventory=_inventory(bridge), with_ray=False)
    with pytest.raises(HearthError) as failed:
        asyncio.run(run.up())
    assert "qemu exited with status 1" in str(failed.value) and "kernel" in str(failed.value)
    states = [e["state"] for e in run.summary()["nodes"][0]["events"]]
    assert states[-3:] == ["failed", "stopping", "stopped"] and states.count("vmm_started") == 0
    assert not _qemus(str(run_dir)) and not _taps()
    assert not (run_dir / "run" / "vms").exists()  # its logs too, once the backend closed


def test_two_vms_join_ray_run_tasks_and_power_off_when_the_controller_dies(request, tmp_path, run_dir, bridge, image):
    """The whole path, as a user runs it: `hearth up` (its supervisor is the controller), a Ray job with a task
    on each VM, then the controller SIGKILLed: each guest's dead man's switch powers its VM off."""
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"head_host: {GATEWAY}\nhosts:\n  - name: local\n    network: {{bridge: {bridge}, subnet: {SUBNET}}}\n")
    name = f"e2e{os.getpid() % 10000}"
    run_dir = run_dir / name  # short (Ray's socket paths live under it), and this user's alone (userdirs.py)
    env = {**os.environ, "HEARTH_STATE_DIR": str(tmp_path / "state"), "HEARTH_RUN_DIR": str(run_dir.parent),
           "COLUMNS": "160"}
    started = time.monotonic()
    up = subprocess.run([HEARTH, "up", "--backend", "qemu", "--hosts", str(hosts), "--image", str(image), "--nodes", "2",
                         "--cpus", "1", "--memory-gib", "2", "--boot-timeout", "400", "--name", name],
                        capture_output=True, text=True, env=env, timeout=600)
    up_s = time.monotonic() - started
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        _say(request, f"\nhearth up, 2 VMs under TCG: {up_s:.1f} s\n{up.stdout}")
        state = json.loads(subprocess.run([HEARTH, "status", "--name", name, "--json"], capture_output=True, text=True,
                                          env=env, check=True).stdout)
        nodes = state["nodes"]
        assert [n["state"] for n in nodes] == ["ready", "ready"]
        for node in nodes:
            # the guests mount the controller's environment image before `ray start`
            assert set(node["guest_profile"]) == {"firmware", "kernel", "agent", "env mount", "ray start"}
            assert 0 < node["guest_profile"]["kernel"] < node["profile"]["guest_up"] + node["profile"]["vmm_started"]

        script = tmp_path / "where.py"
        script.write_text(
            "import ray\nray.init()\n"
            "ids = sorted(n['Labels']['hearth.io/node'] for n in ray.nodes() if n['Alive'] and 'hearth.io/node' in n['Labels'])\n"
            "root = lambda: [line.split()[2] for line in open('/proc/mounts') if line.split()[1] == '/'][-1]\n"
            "where = ray.remote(num_cpus=1)(lambda: (ray.get_runtime_context().get_node_labels()['hearth.io/node'],"
            " open('/etc/hostname').read().strip(), root()))\n"
            "print('ran on', ray.get([where.options(label_selector={'hearth.io/node': i}).remote() for i in ids]))\n")
        started = time.monotonic()
        job = subprocess.run([HEARTH, "job", "submit", "--name", name, "--", "python", str(script)],
                             capture_output=True, text=True, env=env, timeout=400)
        job_s = time.monotonic() - started
        assert job.returncode == 0, job.stdout + job.stderr
        # each task ran inside its own VM (the image's hostname, an overlay root), on the node its label names
        assert f"ran on [('{name}-0', 'hearth-guest', 'overlay'), ('{name}-1', 'hearth-guest', 'overlay')]" in job.stdout

        assert len(_qemus(str(run_dir))) == 2 and len(_taps()) == 2
        os.kill(state["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while _qemus(str(run_dir)) and time.monotonic() - killed < 90:
            time.sleep(0.2)
        gone_s = time.monotonic() - killed
        assert not _qemus(str(run_dir)), "the VMs did not power off after their controller died"
        _say(request, f"a task on each VM (job, workers started cold under TCG): {job_s:.1f} s; "
                      f"controller SIGKILLed -> both VMs powered off in {gone_s:.1f} s (the guests wait 10 s for it)")
        for node in nodes:
            serial = (run_dir / "vms" / node["id"] / "serial.log").read_text()
            assert "powering off: the host end has been gone for 10 s" in serial
        # nothing left: no VMM, tap, disk layer, Ray process of this cluster; the node directories keep their logs
        assert not _taps()
        left = {p.name for p in (run_dir / "vms").rglob("*") if not p.is_dir()}
        assert left <= {"serial.log", "qemu.log", "channel.sock"}, f"a node left more than its logs: {left}"
        manifest = json.loads((image / "manifest.json").read_text())  # the shared disk was read-only to every guest
        assert hashlib.sha256((image / "rootfs.img").read_bytes()).hexdigest() == manifest["files"]["rootfs.img"]
        ray_left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
        assert not ray_left, f"processes of the dead cluster are left: {ray_left}"
        status = subprocess.run([HEARTH, "status", "--name", name], capture_output=True, text=True, env=env)
        assert "gone (its supervisor is not running)" in status.stdout
    finally:  # a failed assertion leaves no cluster to the tests after it (its taps would be busy)
        subprocess.run([HEARTH, "down", "--name", name], capture_output=True, env=env, timeout=120)
    subprocess.run(["rm", "-rf", str(run_dir)])


def test_a_controller_killed_mid_boot_leaves_no_vm(request, tmp_path, run_dir, bridge, image):
    """The dead man's switch holds during `ray start` too: the controller dies after the guests said hello,
    before they joined Ray."""
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"head_host: {GATEWAY}\nhosts:\n  - name: local\n    network: {{bridge: {bridge}, subnet: {SUBNET}}}\n")
    name = f"mid{os.getpid() % 10000}"
    run_dir = run_dir / name
    state_dir = tmp_path / "state"
    env = {**os.environ, "HEARTH_STATE_DIR": str(state_dir), "HEARTH_RUN_DIR": str(run_dir.parent)}
    up = subprocess.Popen([HEARTH, "up", "--backend", "qemu", "--hosts", str(hosts), "--image", str(image), "--nodes", "2",
                           "--cpus", "1", "--memory-gib", "2", "--name", name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
    try:
        events = state_dir / "clusters" / name / "events.jsonl"
        deadline = time.monotonic() + 120
        greeted: set[str] = set()
        while len(greeted) < 2 and time.monotonic() < deadline and up.poll() is None:
            if events.exists():
                for line in events.read_text().splitlines():
                    event = json.loads(line)
                    assert event["state"] not in ("ray_joined", "ready"), "joined before the controller could be killed"
                    if event["state"] == "guest_up":
                        greeted.add(event["node"])
            time.sleep(0.1)
        assert len(greeted) == 2, f"the guests did not say hello: {up.stdout.read() if up.poll() is not None else ''}"
        supervisor = json.loads((state_dir / "clusters" / name / "state.json").read_text())["pid"]
        os.kill(supervisor, signal.SIGKILL)
        killed = time.monotonic()
        assert "did not come up" in up.communicate(timeout=30)[0]
        while _qemus(str(run_dir)) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        gone_s = time.monotonic() - killed
        assert not _qemus(str(run_dir)), "VMs outlived their controller, killed while they ran `ray start`"
        _say(request, f"\ncontroller SIGKILLed during `ray start` -> both VMs powered off in {gone_s:.1f} s")
        assert not _taps()
        assert not subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    finally:  # a failed assertion leaves no cluster to the tests after it
        up.kill()
        subprocess.run([HEARTH, "down", "--name", name], capture_output=True, env=env, timeout=120)
    subprocess.run(["rm", "-rf", str(run_dir)])


def test_the_notebooks_work_runs_on_vms_in_its_own_environment(request, tmp_path, run_dir, bridge, image, monkeypatch,
                                                               capfd):
    """Two VMs from the notebook API (`Pool`), in a directory holding the notebook's own module and data: a
    cell-defined function imports a pure-Python and a compiled package installed only in this (the
    controller's) environment, the module next to the notebook, and reads the data file by its relative path;
    the module is edited and the next call sees it; Ray runs on the controller's own Python (the environment
    image carries it), so no worker warns of a patch-version mismatch; each VM is named after its node."""
    from provisioner import Pool

    notebook = tmp_path / "nb"
    notebook.mkdir()
    (notebook / "mylib.py").write_text("VALUE = 1\n")
    (notebook / "data.txt").write_text("next to the notebook\n")
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"head_host: {GATEWAY}\nhosts:\n  - name: local\n    network: {{bridge: {bridge}, subnet: {SUBNET}}}\n")
    monkeypatch.chdir(notebook)
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HEARTH_RUN_DIR", str(run_dir))
    name = f"nb{os.getpid() % 10000}"

    def work(_):
        import socket

        import mylib
        import tabulate
        import ujson

        return (socket.gethostname(), mylib.VALUE, ujson.dumps({"a": 1}),
                tabulate.tabulate([[1, 2]], tablefmt="plain").split()[-1], open("data.txt").read().strip())

    started = time.monotonic()
    with Pool(min=2, max=2, backend="qemu", hosts=hosts, image=image, memory_gib=2, boot_timeout=600, name=name) as pool:
        up_s = time.monotonic() - started
        env = pool._run.summary()["env"]
        first = pool.map(work, range(2))
        first_s = time.monotonic() - started - up_s
        (notebook / "mylib.py").write_text("VALUE = 2\n")
        again = time.monotonic()
        second = pool.map(work, range(2))
        second_s = time.monotonic() - again
        profiles = [n["guest_profile"] for n in pool.nodes]
    assert sorted(first) == [(f"{name}-{i}", 1, '{"a":1}', "2", "next to the notebook") for i in range(2)]
    assert sorted(second) == [(f"{name}-{i}", 2, '{"a":1}', "2", "next to the notebook") for i in range(2)]
    assert env["interpreter"] == "shipped" and env["hosts"]["local"]["already_there"]
    output = capfd.readouterr()
    assert "patch version mismatch" not in (output.out + output.err).lower()
    packed = "found packed" if env["cached"] else f"packed in {env['pack_s']} s"
    mounts = ", ".join(f"{p.get('env mount', 0):.2f} s" for p in profiles)
    _say(request, f"\nPool of 2 VMs from the notebook API: up {up_s:.1f} s (environment image {env['size'] >> 20} MiB, "
                  f"{packed}); first map (cold workers) {first_s:.1f} s; after an edit, the next map {second_s:.2f} s; "
                  f"mounting the environment image inside each VM: {mounts}")
    assert all("env mount" in p for p in profiles), profiles
