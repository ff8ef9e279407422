"""Per-user run and state directories (provisioner/userdirs.py): made 0700, checked on every use, refused with
the fix when another user could tamper with them. "Another user" is a throwaway uid given to a directory with
os.chown (the tests run as root); the machine's real /tmp/hearth-<uid> is never touched: `userdirs.TMP` points
at a sticky, world-writable directory made for the test, as /tmp is."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from provisioner import userdirs
from provisioner.errors import UnsafeDirectory

OTHER = 54321  # a uid nobody on this machine has: "another local user"
pytestmark = pytest.mark.root("making a directory another user's (os.chown) needs root")


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A stand-in for /tmp (sticky, everyone may write) and an environment without any hearth overrides."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    monkeypatch.setattr(userdirs, "TMP", sticky)
    for name in (userdirs.RUN_ENV, userdirs.STATE_ENV, "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir(mode=0o700)
    return sticky


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_default_run_root_is_per_user_and_private(tmp):
    root = userdirs.run_root()
    assert root == tmp / f"hearth-{os.geteuid()}" and _mode(root) == 0o700 and root.stat().st_uid == os.geteuid()
    assert userdirs.run_root() == root  # checked again, used again
    cluster = userdirs.ensure(userdirs.run_dir("c1"))
    assert cluster == root / "c1" and _mode(cluster) == 0o700
    state = userdirs.state_root()
    assert state == Path(os.environ["HOME"]) / ".hearth" / "clusters"
    assert _mode(state) == 0o700 and _mode(state.parent) == 0o700


def test_a_run_root_precreated_by_another_user_is_refused_with_the_fix(tmp):
    planted = tmp / f"hearth-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    os.chown(planted, OTHER, OTHER)
    with pytest.raises(UnsafeDirectory) as refused:
        userdirs.run_root()
    text = str(refused.value)
    assert f"{planted} belongs to uid {OTHER}, not to you" in text
    assert f"Remove {planted} (as root if another user made it), or set HEARTH_RUN_DIR" in text
    assert list(planted.iterdir()) == [] and planted.stat().st_uid == OTHER  # nothing written, nothing taken over


@pytest.mark.parametrize("problem", ["mode", "symlink", "writable-parent", "foreign-parent", "file"])
def test_a_run_dir_others_could_touch_is_refused(tmp, tmp_path, monkeypatch, problem):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    target = tmp_path / "runs"
    if problem == "mode":
        target.mkdir(mode=0o700)
        target.chmod(0o755)
        words = "has mode 0755: others may use it"
    elif problem == "symlink":  # another user's link to a directory of ours: they could re-point it later
        target.symlink_to(mine)
        os.lchown(target, OTHER, OTHER)
        words = f"lies under {target}, a symlink of uid {OTHER}"
    elif problem == "writable-parent":
        parent = tmp_path / "open"
        parent.mkdir()
        parent.chmod(0o777)  # not sticky: anyone may rename what is in it
        target = parent / "runs"
        target.mkdir(mode=0o700)
        words = "which others can write to"
    elif problem == "foreign-parent":
        parent = tmp_path / "theirs"
        parent.mkdir(mode=0o755)
        os.chown(parent, OTHER, OTHER)
        target = parent / "runs"
        target.mkdir(mode=0o700)
        words = f"a directory of uid {OTHER}"
    else:
        target.write_text("")
        words = "is not a directory"
    if problem == "symlink":
        target = target / "x"  # the link is a parent: ours below it, but its owner could swap it
    monkeypatch.setenv(userdirs.RUN_ENV, str(target))
    with pytest.raises(UnsafeDirectory, match=words) as refused:
        userdirs.run_root()
    assert "Point HEARTH_RUN_DIR at a directory of your own (mkdir -m 700 DIR)" in str(refused.value)
    assert list(mine.iterdir()) == []  # nothing made through the link


def test_a_symlinked_run_dir_is_refused_even_when_it_is_ours(tmp, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(mine)
    monkeypatch.setenv(userdirs.RUN_ENV, str(tmp_path / "link"))
    with pytest.raises(UnsafeDirectory, match="is a symlink"):
        userdirs.run_root()


def test_state_dir_checked_the_same_way(tmp, tmp_path, monkeypatch):
    home = Path(os.environ["HOME"])
    (home / ".hearth").mkdir(mode=0o755)  # made by an older hearth with the default umask
    with pytest.raises(UnsafeDirectory) as refused:
        userdirs.state_root()
    assert f"{home / '.hearth'} has mode 0755" in str(refused.value) and "chmod 700" in str(refused.value)
    assert not (home / ".hearth" / "clusters").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER, OTHER)
    monkeypatch.setenv(userdirs.STATE_ENV, str(theirs))
    with pytest.raises(UnsafeDirectory, match=f"state directory \\(HEARTH_STATE_DIR\\) {theirs} belongs to uid {OTHER}"):
        userdirs.state_root()


def test_xdg_runtime_dir_is_used_only_when_it_is_usable(tmp, tmp_path, monkeypatch):
    runtime = Path(tempfile.mkdtemp(prefix="x", dir="/tmp"))  # short, as /run/user/<uid> is
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        assert userdirs.run_root() == runtime / "hearth" and _mode(runtime / "hearth") == 0o700
        runtime.chmod(0o755)  # not as the XDG spec promises: not used, /tmp/hearth-<uid> is
        assert userdirs.run_root() == tmp / f"hearth-{os.geteuid()}"
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    long = tmp_path / ("x" * userdirs.MAX_RUN_DIR)
    long.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long))  # no room for Ray's sockets under a cluster there
    assert userdirs.run_root() == tmp / f"hearth-{os.geteuid()}"


def test_cluster_pool_and_hearth_up_refuse_before_anything_starts(tmp, tmp_path, monkeypatch):
    from provisioner import Cluster, Pool

    planted = tmp / f"hearth-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    os.chown(planted, OTHER, OTHER)
    state = tmp_path / "state"
    monkeypatch.setenv(userdirs.STATE_ENV, str(state))
    for start in (lambda: Cluster(nodes=1, name="evil", show=False, sync_code=False),
                  lambda: Pool(max=1, name="evil", sync_code=False)):
        with pytest.raises(UnsafeDirectory, match=f"belongs to uid {OTHER}"):
            start()
    assert not (state / "clusters" / "evil").exists() and list(planted.iterdir()) == []
    env = {**os.environ, "HEARTH_STATE_DIR": str(state), "HEARTH_RUN_DIR": str(planted)}
    up = subprocess.run([str(Path(sys.executable).with_name("hearth")), "up", "--nodes", "1", "--name", "evil"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert f"error: the run directory (HEARTH_RUN_DIR) {planted} belongs to uid {OTHER}" in up.stderr
    assert not (state / "clusters" / "evil").exists() and list(planted.iterdir()) == []


def test_the_dashboard_proxy_never_reads_a_token_from_a_state_dir_others_control(tmp, tmp_path, monkeypatch):
    """A planted state.json could point the proxy at a server of theirs, which would then receive the token."""
    from provisioner.dashboard_proxy import dashboard_of

    theirs = tmp_path / "state"
    (theirs / "clusters" / "c").mkdir(parents=True)
    theirs.chmod(0o777)
    monkeypatch.setenv(userdirs.STATE_ENV, str(theirs))
    with pytest.raises(UnsafeDirectory, match="has mode 0777"):
        dashboard_of("c")


def test_qemu_writes_its_root_script_only_into_a_private_directory(tmp_path):
    """QEMU runs `ifup` as root to put the tap on the bridge: it is written fresh (never through a planted link)
    into the node's directory, and only once that directory is checked to be this user's alone."""
    from provisioner.events import NodeHistory, NodeTracker
    from provisioner.node import GuestConfig, NodeSpec, RayJoin
    from provisioner.qemu.vm import QemuVm

    runs = tmp_path / "vms"
    runs.mkdir(mode=0o700)
    node = NodeSpec(id="q-0", uid="u", host="local", image=tmp_path, ray=RayJoin(address="10.0.0.1:1", token="t"))
    vm = QemuVm(node, runs, GuestConfig.for_node(node, network=None, reconnect_s=10), NodeTracker(NodeHistory("q-0")), accel="tcg",
                network={"tap": "hth0", "mac": "52:54:00:00:00:01", "bridge": "br0"})
    userdirs.ensure(vm.dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    (vm.dir / "ifup").symlink_to(elsewhere)  # a leftover link must not be written through
    script = vm._write_ifup()
    assert _mode(script) == 0o700 and not script.is_symlink() and "master br0" in script.read_text()
    assert elsewhere.read_text() == ""
    script.unlink()
    os.chown(vm.dir, OTHER, OTHER)
    with pytest.raises(UnsafeDirectory, match=f"VM directory {vm.dir} belongs to uid {OTHER}"):
        vm._write_ifup()
    assert not script.exists()
    os.chown(vm.dir, 0, 0)
    runs.chmod(0o777)  # a parent others can write to: they could swap the node's directory
    with pytest.raises(UnsafeDirectory, match="which others can write to"):
        vm._write_ifup()
