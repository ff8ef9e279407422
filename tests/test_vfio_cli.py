"""`hearth vfio` as an admin runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hosts import HGX_GPUS, gpu_with_nic, hgx_h100
from hosttree import FakeKernel

HEARTH = shutil.which("hearth", path=str(Path(sys.executable).parent)) or "hearth"


def hearth(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([HEARTH, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_status_and_check_on_this_machine():
    """The real root of the machine the tests run on. On the CI machine: no GPUs and no IOMMU."""
    status = hearth("vfio", "status")
    assert status.returncode == 0, status.stderr
    assert "Host readiness (host root /)" in status.stdout
    report = json.loads(hearth("vfio", "status", "--json").stdout)
    check = hearth("vfio", "check")
    assert check.returncode == report["exit_code"]
    assert json.loads(hearth("vfio", "check", "--json").stdout)["exit_code"] == check.returncode
    if not os.listdir("/sys/kernel/iommu_groups"):
        assert check.returncode == 2
        assert "IOMMU is off" in check.stdout and "fix: enable VT-d / AMD-Vi in the firmware" in check.stdout
    if not report["gpus"]:
        assert "no NVIDIA GPUs found on this host" in status.stdout


def test_status_shows_the_hgx_table(tmp_path):
    hgx_h100(tmp_path)
    status = hearth("vfio", "status", "--host-root", str(tmp_path))
    assert status.returncode == 0
    for address in HGX_GPUS:
        assert address in status.stdout
    assert "GH100 [H100 SXM5 80GB]" in status.stdout and "(NVSwitch)" in status.stdout
    assert "on nvidia, not vfio-pci" in status.stdout
    data = json.loads(hearth("vfio", "status", "--json", env={"HEARTH_HOST_ROOT": str(tmp_path)}).stdout)
    assert len(data["gpus"]) == 12 and data["exit_code"] == 2
    assert data["gpus"][0]["device"]["numa_node"] == 0 and data["gpus"][0]["device"]["link_width"] == 16


def test_bind_all_gpus_persist_then_check_is_green(tmp_path):
    tree = hgx_h100(tmp_path)
    root = ["--host-root", str(tmp_path)]
    assert hearth("vfio", "check", *root).returncode == 2
    with FakeKernel(tree):
        bind = hearth("vfio", "bind", "--all-gpus", "--persist", *root)
    assert bind.returncode == 0, bind.stderr
    assert bind.stdout.count("nvidia -> vfio-pci (changed)") == 8
    assert [tree.current(a) for a in HGX_GPUS] == ["vfio-pci"] * 8
    record = (tmp_path / "etc/hearth/vfio-pci.conf").read_text()
    assert all(f"{a} 10de:2330" in record for a in HGX_GPUS)
    check = hearth("vfio", "check", *root)
    assert check.returncode == 0 and "OK: host ready for VFIO, 8 GPUs checked" in check.stdout
    again = hearth("vfio", "bind", "--all-gpus", *root)  # no kernel serving: it must not write at all
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 8


def test_dry_run_prints_the_writes_and_changes_nothing(tmp_path):
    tree = hgx_h100(tmp_path)
    before = tree.snapshot()
    run = hearth("vfio", "bind", HGX_GPUS[0], "--dry-run", "--persist", "--host-root", str(tmp_path))
    assert run.returncode == 0
    assert f"echo vfio-pci > {tmp_path}/sys/bus/pci/devices/{HGX_GPUS[0]}/driver_override" in run.stdout
    assert f"echo {HGX_GPUS[0]} > {tmp_path}/sys/bus/pci/drivers/nvidia/unbind" in run.stdout
    assert "dry run: nothing was written" in run.stdout
    assert tree.snapshot() == before and not (tmp_path / "etc/hearth").exists()


@pytest.mark.parametrize("args, message", [
    (["bind", "../../etc"], "is not a PCI address; use the sysfs form 0000:3b:00.0"),
    (["bind"], "give ADDRESS..., --all-gpus or --persisted"),
    (["bind", "0000:18:00.0", "--all-gpus"], "exactly one of them"),
    (["unbind", "0000:18:00.0", "--driver", "../nvidia"], "not a kernel driver name"),
])
def test_bad_input_exits_2_with_the_fix(tmp_path, args, message):
    hgx_h100(tmp_path)
    run = hearth("vfio", *args, "--host-root", str(tmp_path))
    assert run.returncode == 2 and message in run.stderr


def test_refusal_exits_1_and_names_the_other_device(tmp_path):
    gpu_with_nic(tmp_path)
    run = hearth("vfio", "bind", "0000:41:00.0", "--host-root", str(tmp_path))
    assert run.returncode == 1
    assert "refusing to bind; nothing was changed" in run.stderr and "0000:42:00.0" in run.stderr


def test_check_cannot_read_host_exits_3(tmp_path):
    run = hearth("vfio", "check", "--host-root", str(tmp_path / "nope"))
    assert run.returncode == 3 and "is not a directory" in run.stderr


def test_persisted_rebinds_at_boot_and_skips_a_moved_card(tmp_path):
    tree = hgx_h100(tmp_path)
    (tmp_path / "etc/hearth").mkdir(parents=True)
    (tmp_path / "etc/hearth/vfio-pci.conf").write_text(
        f"# boot record\n{HGX_GPUS[0]} 10de:2330\n{HGX_GPUS[1]} 10de:2330\n0000:19:00.0 10de:2330\n")
    with FakeKernel(tree):
        run = hearth("vfio", "bind", "--persisted", "--host-root", str(tmp_path))
    assert run.returncode == 1
    assert "0000:19:00.0: recorded as 10de:2330 but 15b3:1021 there now; not binding it" in run.stderr
    assert [tree.current(a) for a in (*HGX_GPUS[:3], "0000:19:00.0")] == ["vfio-pci", "vfio-pci", "nvidia", "mlx5_core"]


def test_unbind_drops_the_boot_record(tmp_path):
    tree = hgx_h100(tmp_path)
    root = ["--host-root", str(tmp_path)]
    with FakeKernel(tree):
        assert hearth("vfio", "bind", *HGX_GPUS[:2], "--persist", *root).returncode == 0
        run = hearth("vfio", "unbind", HGX_GPUS[0], "--driver", "nvidia", *root)
    assert run.returncode == 0, run.stderr
    assert tree.current(HGX_GPUS[0]) == "nvidia"
    record = (tmp_path / "etc/hearth/vfio-pci.conf").read_text()
    assert HGX_GPUS[0] not in record and HGX_GPUS[1] in record


@pytest.mark.requires("systemd-analyze")
def test_boot_unit_is_valid_and_runs_the_persisted_bind(tmp_path):
    unit = (Path(__file__).parents[1] / "vfio/hearth-vfio-bind.service").read_text()
    assert "ExecStart=/usr/local/bin/hearth vfio bind --persisted\n" in unit
    copy = tmp_path / "hearth-vfio-bind.service"
    copy.write_text(unit.replace("/usr/local/bin/hearth", HEARTH))
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
