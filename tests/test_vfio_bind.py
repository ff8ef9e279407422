"""Binding and unbinding through real sysfs-style writes, served by the FakeKernel stand-in."""

from __future__ import annotations

import os
import time

import pytest

from fakenvml import FakeNvml
from hosts import (HGX_GPUS, SHARED_GPU, SHARED_NIC, WORKSTATION_FUNCTIONS, WORKSTATION_GPU, gpu_with_nic,
                   hgx_h100, iommu_off, workstation)
from hosttree import FakeKernel
from provisioner.errors import BindFailed, BindRefused, HostRootError, SpecError
from vfio.bind import apply, plan_bind, plan_unbind
from vfio.hostroot import HostRoot


def test_bind_one_hgx_gpu(tmp_path):
    tree = hgx_h100(tmp_path)
    host = HostRoot(tmp_path)
    before = tree.snapshot()
    plan = plan_bind(host, ["00000000:3A:00.0"], nvml=FakeNvml())  # NVML's form is accepted
    (step,) = plan.steps
    assert [str(w) for w in step.writes] == [
        f"echo vfio-pci > {tmp_path}/sys/bus/pci/devices/0000:3a:00.0/driver_override",
        f"echo 0000:3a:00.0 > {tmp_path}/sys/bus/pci/drivers/nvidia/unbind",
        f"echo 0000:3a:00.0 > {tmp_path}/sys/bus/pci/drivers_probe",
    ]
    with FakeKernel(tree) as kernel:
        result = apply(host, plan, timeout=5)
    assert [(o.address, o.before, o.after, o.status) for o in result.outcomes] == [
        ("0000:3a:00.0", "nvidia", "vfio-pci", "changed")]
    assert kernel.writes == [("sys/bus/pci/drivers/nvidia/unbind", "0000:3a:00.0"),
                             ("sys/bus/pci/drivers_probe", "0000:3a:00.0")]
    assert tree.override("0000:3a:00.0") == "vfio-pci"
    assert (tmp_path / "dev/vfio" / str(tree.group("0000:3a:00.0"))).exists()
    after = tree.snapshot()
    assert {a for a in before if before[a] != after[a]} == {"0000:3a:00.0"}


def test_bind_is_idempotent(tmp_path):
    tree = hgx_h100(tmp_path, gpu_driver="vfio-pci")
    plan = plan_bind(HostRoot(tmp_path), HGX_GPUS)
    assert plan.steps == [] and [d.address for d in plan.unchanged] == sorted(HGX_GPUS)
    with FakeKernel(tree) as kernel:
        result = apply(HostRoot(tmp_path), plan)
    assert kernel.writes == [] and {o.status for o in result.outcomes} == {"unchanged"}


def test_bind_takes_the_whole_card_and_leaves_the_bridge(tmp_path):
    tree = workstation(tmp_path)
    host = HostRoot(tmp_path)
    plan = plan_bind(host, [WORKSTATION_GPU], nvml=FakeNvml())
    assert [s.device.address for s in plan.steps] == [WORKSTATION_GPU, *WORKSTATION_FUNCTIONS]
    with FakeKernel(tree):
        apply(host, plan, timeout=5)
    assert [tree.current(a) for a in [WORKSTATION_GPU, *WORKSTATION_FUNCTIONS]] == ["vfio-pci"] * 4
    assert tree.current("0000:00:01.1") == "pcieport"
    # and back: without --driver each function returns to the driver the kernel probes for it
    plan = plan_unbind(host, [WORKSTATION_GPU])
    with FakeKernel(tree):
        apply(host, plan, timeout=5)
    assert [tree.current(a) for a in [WORKSTATION_GPU, *WORKSTATION_FUNCTIONS]] == [
        "nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"]
    assert [tree.override(a) for a in [WORKSTATION_GPU, *WORKSTATION_FUNCTIONS]] == [None] * 4
    assert not (tmp_path / "dev/vfio/12").exists()


def test_dry_run_plan_writes_nothing(tmp_path):
    tree = workstation(tmp_path)
    before = tree.snapshot()
    plan = plan_bind(HostRoot(tmp_path), [WORKSTATION_GPU], nvml=FakeNvml())
    assert len([w for s in plan.steps for w in s.writes]) == 12
    assert tree.snapshot() == before


def test_group_with_a_nic_is_refused_and_names_it(tmp_path):
    tree = gpu_with_nic(tmp_path)
    before = tree.snapshot()
    with pytest.raises(BindRefused) as refused:
        plan_bind(HostRoot(tmp_path), [SHARED_GPU], nvml=FakeNvml())
    assert "nothing was changed" in str(refused.value)
    assert SHARED_NIC in str(refused.value) and "mlx5_core" in str(refused.value)
    assert tree.snapshot() == before
    # naming the NIC too is the admin saying it goes to VMs as well
    plan = plan_bind(HostRoot(tmp_path), [SHARED_GPU, SHARED_NIC], nvml=FakeNvml())
    assert [s.device.address for s in plan.steps] == [SHARED_GPU, SHARED_NIC]


@pytest.mark.parametrize("nvml_gpu, holder, expected", [
    ({"processes": [777]}, None, "NVML lists processes on it (pid 777)"),
    ({"persistence": True}, None, "nvidia-smi -i 0000:5d:00.0 -pm 0"),
    ({}, (4242, "python", ["/dev/nvidia3"]), "pid 4242 (python) holds /dev/nvidia3"),
])
def test_gpu_in_use_is_refused_with_its_users(tmp_path, nvml_gpu, holder, expected):
    tree = hgx_h100(tmp_path)
    if holder:
        tree.process(*holder)
    tree.process(5000, "bash", ["/dev/nvidia4"])  # another GPU's user does not matter
    gpus = [{"address": a, "name": "H100", "uuid": f"GPU-{i}", "minor": i} for i, a in enumerate(HGX_GPUS)]
    gpus[3].update(nvml_gpu)
    before = tree.snapshot()
    with pytest.raises(BindRefused, match="0000:5d:00.0: ") as refused:
        plan_bind(HostRoot(tmp_path), ["0000:5d:00.0"], nvml=FakeNvml(gpus))
    assert expected in str(refused.value)
    assert tree.snapshot() == before
    plan_bind(HostRoot(tmp_path), ["0000:2a:00.0"], nvml=FakeNvml(gpus))  # an idle GPU is fine


def test_unknown_minor_and_no_nvml_counts_any_nvidia_holder(tmp_path):
    tree = hgx_h100(tmp_path)
    os.unlink(tmp_path / "proc/driver/nvidia/gpus" / HGX_GPUS[0] / "information")
    tree.process(99, "persistenced", ["/dev/nvidia6"])
    with pytest.raises(BindRefused, match="pid 99 \\(persistenced\\)"):
        plan_bind(HostRoot(tmp_path), [HGX_GPUS[0]], nvml=FakeNvml(fail_init=True))


def test_iommu_off_or_vfio_pci_missing_is_refused(tmp_path):
    iommu_off(tmp_path)
    with pytest.raises(BindRefused) as refused:
        plan_bind(HostRoot(tmp_path), ["0000:3b:00.0"], nvml=FakeNvml())
    assert "IOMMU is off" in str(refused.value) and "modprobe vfio-pci" in str(refused.value)


def test_bad_or_unknown_addresses_are_refused_before_anything(tmp_path):
    tree = hgx_h100(tmp_path)
    before = tree.snapshot()
    with pytest.raises(SpecError):
        plan_bind(HostRoot(tmp_path), ["../../../../tmp/x"])
    with pytest.raises(BindRefused, match="0000:77:00.0: no such PCI device"):
        plan_bind(HostRoot(tmp_path), ["0000:77:00.0"])
    with pytest.raises(BindRefused, match="bridges stay with the host"):
        plan_bind(HostRoot(tmp_path), ["0000:17:01.0"])
    assert tree.snapshot() == before


def test_driver_symlinked_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    tree = hgx_h100(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(tree.sys / "bus/pci/drivers/nvidia", tmp_path / "nvidia.real")
    os.symlink(outside, tree.sys / "bus/pci/drivers/nvidia")
    with pytest.raises(HostRootError, match="outside the host root"):
        plan_bind(HostRoot(root), [HGX_GPUS[0]], nvml=FakeNvml())
    assert os.listdir(outside) == []


def test_hung_nvidia_unbind_times_out_and_the_rest_is_restored(tmp_path):
    tree = workstation(tmp_path)
    host = HostRoot(tmp_path)
    plan = plan_bind(host, [WORKSTATION_GPU], nvml=FakeNvml())
    with FakeKernel(tree, hang={"nvidia"}):
        started = time.monotonic()
        with pytest.raises(BindFailed) as failed:
            apply(host, plan, timeout=0.5)
        assert time.monotonic() - started < 5
    outcomes = {o.address: o.status for o in failed.value.result.outcomes}
    # the GPU went first, stuck in the driver; nothing else was touched, so nothing else changed
    assert outcomes == {WORKSTATION_GPU: "stuck"}
    assert "did not finish in 0.5 s" in str(failed.value) and "reboot" in str(failed.value)
    assert tree.current(WORKSTATION_FUNCTIONS[0]) == "snd_hda_intel"


def test_failure_half_way_restores_every_device(tmp_path):
    tree = workstation(tmp_path)
    host = HostRoot(tmp_path)
    before = tree.snapshot()
    plan = plan_bind(host, [WORKSTATION_GPU], nvml=FakeNvml())
    with FakeKernel(tree, hang={"xhci_hcd"}):  # the third function's unbind hangs
        with pytest.raises(BindFailed) as failed:
            apply(host, plan, timeout=0.5)
    outcomes = {o.address: o.status for o in failed.value.result.outcomes}
    assert outcomes == {WORKSTATION_GPU: "restored", WORKSTATION_FUNCTIONS[0]: "restored",
                        WORKSTATION_FUNCTIONS[1]: "stuck"}
    after = tree.snapshot()
    assert after[WORKSTATION_GPU] == before[WORKSTATION_GPU] == ("nvidia", None)
    assert after[WORKSTATION_FUNCTIONS[0]] == ("snd_hda_intel", None)
    assert not (tmp_path / "dev/vfio/12").exists()


def test_probe_that_binds_nothing_is_verified_and_rolled_back(tmp_path):
    tree = hgx_h100(tmp_path)
    host = HostRoot(tmp_path)
    before = tree.snapshot()
    plan = plan_bind(host, HGX_GPUS[:2], nvml=FakeNvml())
    with FakeKernel(tree, broken={"vfio-pci"}):
        with pytest.raises(BindFailed, match="did not manage to bind to vfio-pci") as failed:
            apply(host, plan, timeout=0.3)
    assert {o.status for o in failed.value.result.outcomes} == {"restored"}
    assert tree.snapshot() == before


def test_unbind_to_a_named_driver(tmp_path):
    tree = hgx_h100(tmp_path, gpu_driver="vfio-pci")
    host = HostRoot(tmp_path)
    with FakeKernel(tree) as kernel:
        plan = plan_unbind(host, [HGX_GPUS[0]], driver="nvidia")
        assert [(os.path.relpath(w.path, tmp_path), w.value) for w in plan.steps[0].writes] == [
            ("sys/bus/pci/devices/0000:18:00.0/driver_override", ""),
            ("sys/bus/pci/drivers/vfio-pci/unbind", HGX_GPUS[0]),
            ("sys/bus/pci/drivers/nvidia/bind", HGX_GPUS[0])]
        apply(host, plan, timeout=5)
    assert tree.current(HGX_GPUS[0]) == "nvidia" and tree.override(HGX_GPUS[0]) is None
    assert kernel.writes == [("sys/bus/pci/drivers/vfio-pci/unbind", HGX_GPUS[0]),
                             ("sys/bus/pci/drivers/nvidia/bind", HGX_GPUS[0])]
    # again: nothing to do
    assert plan_unbind(host, [HGX_GPUS[0]], driver="nvidia").steps == []


def test_unbind_is_refused_while_a_vm_holds_the_group(tmp_path):
    tree = hgx_h100(tmp_path, gpu_driver="vfio-pci")
    group = tree.group(HGX_GPUS[2])
    tree.process(3131, "cloud-hyperviso", ["/dev/vfio/vfio", f"/dev/vfio/{group}"])
    with pytest.raises(BindRefused, match=f"pid 3131 \\(cloud-hyperviso\\) holds /dev/vfio/{group}"):
        plan_unbind(HostRoot(tmp_path), [HGX_GPUS[2]])
    with pytest.raises(BindRefused, match="the nouveau driver is not loaded; run `modprobe nouveau`"):
        plan_unbind(HostRoot(tmp_path), [HGX_GPUS[1]], driver="nouveau")
