"""Shared fixtures. The Cloud Hypervisor contract test is moved to the end of the run, so it sees every
request the client sent during the suite."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from provisioner.agent.server import spawn
from provisioner.ch.api import ChClient
from provisioner.hosts import Host

SENT: list[tuple[str, str, object]] = []
ChClient.observers.append(lambda method, endpoint, body: SENT.append((method, endpoint, body)))

VENV_BIN = Path(sys.executable).parent
STANDIN = str(VENV_BIN / "cloud-hypervisor-standin")
GUEST = [sys.executable, str(Path(__file__).parent / "guests/channel_guest.py")]
SSHD = "/usr/sbin/sshd"
HEARTH = str(VENV_BIN / "hearth")
IMAGE = Path(os.environ.get("HEARTH_TEST_IMAGE", "/var/cache/hearth/test-guest-image"))
NVIDIA_IMAGE = os.environ.get("HEARTH_TEST_NVIDIA_IMAGE", "/var/cache/hearth/test-guest-image-nvidia")  # + 550, ...
NVIDIA_DRIVERS = os.environ.get("HEARTH_TEST_NVIDIA_DRIVERS", "550").split(",")
# The qemu backend's guests' subnet on this machine's test bridge; HEARTH_TEST_QEMU_SUBNET moves it (a /24) when
# another run's bridge holds this one.
QEMU_SUBNET = os.environ.get("HEARTH_TEST_QEMU_SUBNET", "10.253.0.0/24")
QEMU_GATEWAY = QEMU_SUBNET.rsplit(".", 1)[0] + ".1"
QEMU_TAPS = "hth" + bytes(int(o) for o in QEMU_SUBNET.split(".")[:3]).hex()  # its guests' taps (net.tap_name)


BRIDGE_ALIAS = "hearth-test pid="  # a test bridge's alias names the process that made it


@contextlib.contextmanager
def temporary_bridge(name: str, gateway: str):
    """A bridge with `gateway` (an address/prefix) on it, up, deleted afterwards. A bridge an earlier run left
    behind holding the same subnet (its maker dead: a run killed before its teardown) is deleted first: its route
    would take the guests' traffic. One a live run holds fails here, naming it."""
    subnet = ipaddress.ip_interface(gateway).network
    held = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    for link in held:
        if not any(a.get("family") == "inet" and ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
                   == subnet for a in link.get("addr_info", [])):
            continue
        alias = subprocess.run(["ip", "-j", "link", "show", link["ifname"]], capture_output=True, text=True).stdout
        alias = (json.loads(alias or "[{}]")[0].get("ifalias") or "")
        maker = int(alias[len(BRIDGE_ALIAS):]) if alias.startswith(BRIDGE_ALIAS) else None
        if maker is None and not link["ifname"].startswith(("hbr", "hbf")) or maker is not None and Path(f"/proc/{maker}").exists():
            pytest.fail(f"{link['ifname']} holds {subnet}, which this test's bridge needs ({alias or 'not a test bridge'}): "
                        "end that run, or move this one (HEARTH_TEST_QEMU_SUBNET for the qemu tests)")
        subprocess.run(["ip", "link", "delete", link["ifname"]], capture_output=True)
    for step in (["link", "add", name, "type", "bridge"], ["link", "set", name, "alias", f"{BRIDGE_ALIAS}{os.getpid()}"],
                 ["addr", "add", gateway, "dev", name], ["link", "set", name, "up"]):
        made = subprocess.run(["ip", *step], capture_output=True, text=True)
        assert made.returncode == 0, (step, made.stderr)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", name], capture_output=True)


def say(request, text: str) -> None:
    """To the terminal, past pytest's capture: CI's log shows the figures of every run."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(text, flush=True)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.name.startswith("test_contract_"))


def pytest_runtest_setup(item):
    """`root(why)`, `requires(command)`: skip without them, except in CI (see `lacking`)."""
    missing = []
    root = item.get_closest_marker("root")
    if root is not None and os.geteuid() != 0:
        missing.append(f"{root.args[0] if root.args else 'it needs root'}: run the tests as root")
    for required in item.iter_markers("requires"):
        if shutil.which(required.args[0]) is None:
            missing.append(f"{required.args[0]} is not installed (scripts/test installs it)")
    if missing:
        lacking("; ".join(missing))


def lacking(why: str) -> None:
    """A test cannot run here for `why` (root, a program): it skips on a developer's machine; in CI, which runs as
    root with everything scripts/test installs, a skip would hide a broken setup, so it fails. Fixtures that
    need root or a program (sshd, the guest image, the QEMU bridge) say so through here too, so every test that
    uses them behaves the same whether or not it carries a mark."""
    if os.environ.get("CI") == "true":
        pytest.fail(why + " (CI=true: this must not be skipped)")
    pytest.skip(why)


@pytest.fixture
def run_dir():
    """A short directory for per-node sockets (a Unix socket path must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hearth-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm_files(tmp_path):
    """Stand-ins for a guest kernel, initramfs and image: files CH would open; the stand-in boots none."""
    files = {}
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0" * 4096)
    return files


@pytest.fixture
def agents(run_dir, tmp_path):
    """Start host agents on the cloud-hypervisor STAND-IN: `agents.start(name, root=None, **options)` returns
    the `Host` that reaches it; its VMs live under `agents.vms(name)`. Stopped (SIGTERM) after the test."""

    class Agents:
        def __init__(self) -> None:
            self.processes: dict = {}
            self.started_with: dict = {}

        def start(self, name: str = "a", root: Path | None = None, **options) -> Host:
            if root is None:
                root = tmp_path / f"root-{name}"
                root.mkdir(exist_ok=True)
            self.started_with[name] = (root, options)
            socket = run_dir / f"{name}.sock"
            # A test host's disk is this machine's, shared with everything else a test run writes: the agent
            # keeps 1 GiB free for env images rather than the 5 GiB a GPU host keeps, unless a test sets its own.
            env = {"HEARTH_AGENT_ENV_MARGIN": os.environ.get("HEARTH_AGENT_ENV_MARGIN", "1G"), **(options.get("env") or {})}
            self.processes[name] = spawn(socket, tmp_path / f"state-{name}", self.vms(name), host_root=root,
                                         cloud_hypervisor=STANDIN, log=tmp_path / f"agent-{name}.log",
                                         **{**options, "env": env})
            return Host(name=name, agent_socket=socket)

        def restart(self, name: str) -> Host:
            root, options = self.started_with[name]
            return self.start(name, root, **options)

        def vms(self, name: str) -> Path:
            return run_dir / f"vms-{name}"

        def state(self, name: str) -> Path:
            return tmp_path / f"state-{name}"

        def stop(self, name: str, sig: int = 15) -> None:
            process = self.processes.pop(name)
            process.send_signal(sig)
            process.wait(30)

    started = Agents()
    yield started
    for name in list(started.processes):
        started.stop(name)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1, with its own host key, and a client key it accepts."""
    if not os.path.exists(SSHD):
        lacking("Debian's openssh-server (/usr/sbin/sshd) is not installed (scripts/test installs it)")
    if os.geteuid() != 0:
        lacking("the test's sshd runs as root (its privilege separation): run the tests as root")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowTcpForwarding local
AllowStreamLocalForwarding local
Subsystem sftp internal-sftp
""")
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    log = open(d / "sshd.log", "wb")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert server.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.05)
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    yield {"address": f"ssh://{getpass.getuser()}@127.0.0.1:{port}", "port": port, "user": getpass.getuser(),
           "identity": d / "client_key", "known_hosts": d / "known_hosts", "log": d / "sshd.log"}
    server.terminate()
    server.wait(10)


def _build_image(command: list[str], out: Path, timeout: float) -> tuple[dict, str]:
    """Run `hearth guest build` into `out`, check its files against the manifest, and build again with the same
    inputs, which must reuse it unchanged; returns the manifest and how long each took, in words."""
    started = time.monotonic()
    built = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert built.returncode == 0, built.stdout + built.stderr
    took = time.monotonic() - started
    manifest = json.loads((out / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, f"{name} does not match the manifest"
    started = time.monotonic()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reused" in again.stdout, again.stdout + again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest
    return manifest, (f"{'reused' if 'reused' in built.stdout else 'built'} in {took:.1f} s (a build from scratch "
                      f"took {manifest['built_s']} s); a rebuild with the same inputs: {time.monotonic() - started:.1f} s; "
                      f"rootfs {(out / 'rootfs.img').stat().st_size >> 20} MiB")


@pytest.fixture(scope="session")
def guest_image(request, tmp_path_factory):
    """The guest image every VM test boots: in CI (CI=true) built from scratch; elsewhere into
    HEARTH_TEST_IMAGE (default /var/cache/hearth/test-guest-image), reused while its inputs are unchanged."""
    if os.geteuid() != 0:
        lacking("building the guest image (debootstrap, a loop mount) needs root: run the tests as root")
    if shutil.which("debootstrap") is None:
        lacking("debootstrap is not installed (scripts/test installs it)")
    fresh = os.environ.get("CI") == "true"
    out = tmp_path_factory.mktemp("guest-image") if fresh else IMAGE
    manifest, how = _build_image([HEARTH, "guest", "build", "--out", str(out)], out, timeout=1200)
    say(request, f"\nguest image {out}: {how}")
    yield out
    if fresh:
        subprocess.run(["rm", "-rf", str(out)])


@pytest.fixture(scope="session")
def nvidia_images(request, tmp_path_factory):
    """`nvidia_images("550")` (or "535", "550:proprietary"): the guest image with NVIDIA's driver, built once per
    session whoever asks first (the image tests, the QEMU boots), in CI (CI=true) from scratch, elsewhere into
    HEARTH_TEST_NVIDIA_IMAGE<name> (default /var/cache/hearth/test-guest-image-nvidia550), reused while its inputs
    are unchanged. Returns (branch, flavour, directory, manifest)."""
    fresh = os.environ.get("CI") == "true"
    built: dict[str, tuple] = {}

    def get(driver: str) -> tuple:
        if driver not in built:
            branch, _, flavour = driver.partition(":")
            name = f"{branch}{'-' + flavour if flavour else ''}"
            out = tmp_path_factory.mktemp(f"guest-image-nvidia{name}") if fresh else Path(f"{NVIDIA_IMAGE}{name}")
            command = [HEARTH, "guest", "build", "--out", str(out), "--nvidia-driver", branch,
                       *(["--nvidia-modules", flavour] if flavour else [])]
            manifest, how = _build_image(command, out, timeout=3000)
            nvidia = manifest["nvidia"]
            say(request, f"\nguest image {out} with NVIDIA {manifest['inputs']['nvidia']['driver']} "
                         f"({manifest['inputs']['nvidia']['modules']}): {how}; the modules took {nvidia['modules_s']} s "
                         f"of which DKMS compiling {nvidia['dkms_s']} s with -j{nvidia['jobs']}")
            built[driver] = (branch, flavour or "open", out, manifest)
        return built[driver]

    yield get
    if fresh:
        for _, _, out, _ in built.values():
            subprocess.run(["rm", "-rf", str(out)])


@pytest.fixture(scope="session")
def qemu_bridge():
    """A bridge for the qemu backend's VMs, with the guests' gateway address on it."""
    if os.geteuid() != 0:
        lacking("a bridge and taps for QEMU's VMs need root: run the tests as root")
    if shutil.which("qemu-system-x86_64") is None:
        lacking("qemu-system-x86_64 is not installed (scripts/test installs qemu-system-x86)")
    with temporary_bridge(f"hbrq{os.getpid() % 10000:04d}", f"{QEMU_GATEWAY}/24") as name:
        yield name
