"""The PCI/IOMMU picture and the readiness findings, on sysfs-shaped trees of real host shapes."""

from __future__ import annotations

import os

import pytest

from fakenvml import FakeNvml
from hosts import (HGX_GPUS, HGX_NVSWITCHES, SHARED_NIC, WORKSTATION_FUNCTIONS, WORKSTATION_GPU,
                   gpu_with_nic, hgx_h100, iommu_off, workstation)
from provisioner.errors import HostRootError, SpecError
from vfio.address import parse_address, parse_driver
from vfio.hostroot import HostRoot
from vfio.inventory import host_report
from vfio.pci import PciTopology
from vfio.persist import write_record


@pytest.mark.parametrize("text, canonical", [
    ("0000:3b:00.0", "0000:3b:00.0"),
    ("00000000:3B:00.0", "0000:3b:00.0"),  # NVML's form
    ("3b:00.0", "0000:3b:00.0"),  # lspci's short form
    ("0001:DB:1f.7", "0001:db:1f.7"),
])
def test_addresses_are_canonicalised(text, canonical):
    assert parse_address(text) == canonical


@pytest.mark.parametrize("text", [
    "../../../etc/passwd", "0000:3b:00.0/../../..", "0000:3b:00.0\n/etc", "0000:3b:20.0", "0000:3b:00.8",
    "00010000:3b:00.0", "3b:0.0", "", "nvidia",
])
def test_bad_addresses_are_rejected_with_the_accepted_forms(text):
    with pytest.raises(SpecError, match="use the sysfs form 0000:3b:00.0"):
        parse_address(text)


@pytest.mark.parametrize("name", ["../vfio-pci", "vfio-pci/../../x", "", "NVIDIA", "a b"])
def test_bad_driver_names_are_rejected(name):
    with pytest.raises(SpecError, match="not a kernel driver name"):
        parse_driver(name)


def test_host_paths_cannot_leave_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    os.symlink("/etc", root / "sys/bus/pci/devices/0000:66:00.0")
    host = HostRoot(root)
    with pytest.raises(HostRootError, match="outside the host root"):
        host.path("sys/bus/pci/devices", "0000:66:00.0", "vendor")
    with pytest.raises(HostRootError, match="'..' is not allowed"):
        host.path("sys", "../etc")
    with pytest.raises(HostRootError, match="outside the host root"):
        PciTopology(host)


def test_host_root_must_exist(tmp_path):
    with pytest.raises(HostRootError, match="--host-root DIR"):
        HostRoot(tmp_path / "missing")


def test_host_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOST_ROOT", str(tmp_path))
    assert HostRoot().root == tmp_path.resolve()


def test_hgx_host_inventory(tmp_path):
    hgx_h100(tmp_path)
    topology = PciTopology(HostRoot(tmp_path))
    assert [g.address for g in topology.gpus] == sorted(HGX_GPUS)
    assert [s.address for s in topology.nvswitches] == HGX_NVSWITCHES
    gpu = topology.devices["0000:9a:00.0"]
    assert (gpu.vendor, gpu.device, gpu.pci_class, gpu.subsystem_device) == (0x10DE, 0x2330, 0x030200, 0x16C1)
    assert gpu.name == "GH100 [H100 SXM5 80GB]"
    assert (gpu.driver, gpu.driver_override, gpu.numa_node) == ("nvidia", None, 1)
    assert (gpu.link_speed, gpu.link_width, gpu.reset_methods, gpu.d3cold_allowed) == ("32.0 GT/s PCIe", 16, ["flr", "bus"], True)
    assert not gpu.is_bridge and topology.devices["0000:99:01.0"].is_bridge
    # each GPU alone in its group: no companions, and the group is not viable while nvidia holds it
    assert all(len(topology.group_of(g).members) == 1 and not topology.companions(g) for g in topology.gpus)
    assert not any(topology.group_viable(g) for g in topology.gpus)


def test_hgx_report_says_every_gpu_needs_binding_with_the_command(tmp_path):
    hgx_h100(tmp_path)
    report = host_report(HostRoot(tmp_path), nvml=FakeNvml())
    assert [f.severity for f in report.host if f.check in ("iommu", "modules", "hugepages", "dev-vfio")] == ["ok"] * 4
    gpus = [g for g in report.gpus if g.kind == "gpu"]
    assert len(gpus) == 8 and len(report.gpus) == 12
    for gpu in gpus:
        (driver,) = [f for f in gpu.findings if f.check == "driver"]
        assert driver.severity == "error" and driver.fix == f"hearth vfio bind {gpu.device.address} --persist"
    # NVSwitches stay with the host (shared NVSwitch mode) unless named: shown, not flagged
    assert all(not f.is_problem for g in report.gpus if g.kind == "nvswitch" for f in g.findings)
    assert report.exit_code == 2


def test_nvml_details_are_matched_to_sysfs_addresses(tmp_path):
    hgx_h100(tmp_path)
    nvml = FakeNvml([{"address": a, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i:08x}", "minor": i}
                     for i, a in enumerate(HGX_GPUS)])
    report = host_report(HostRoot(tmp_path), nvml=nvml)
    by_address = {g.device.address: g for g in report.gpus}
    assert report.nvml.available and report.nvml.driver_version == "570.124.06"
    assert by_address["0000:3a:00.0"].nvml.uuid == "GPU-00000002"
    assert by_address["0000:3a:00.0"].nvml.memory_total == 80 << 30
    assert nvml.initialised == 0  # shut down after use


def test_without_nvml_the_report_says_so_and_carries_on(tmp_path):
    hgx_h100(tmp_path)
    report = host_report(HostRoot(tmp_path), nvml=FakeNvml(fail_init=True))
    assert not report.nvml.available and "no nvidia driver" in report.nvml.reason
    assert len(report.gpus) == 12
    # a tree is not this machine: NVML is not asked at all
    assert "NVML describes this machine" in host_report(HostRoot(tmp_path)).nvml.reason


def test_workstation_group_lists_card_functions_and_is_not_viable(tmp_path):
    workstation(tmp_path)
    host = HostRoot(tmp_path)
    topology = PciTopology(host)
    gpu = topology.devices[WORKSTATION_GPU]
    assert [c.address for c in topology.companions(gpu)] == WORKSTATION_FUNCTIONS
    assert [d.pci_class >> 8 for d in topology.companions(gpu)] == [0x0403, 0x0C03, 0x0C80]
    report = host_report(host, nvml=FakeNvml())
    (row,) = report.gpus
    assert len(row.group_members) == 5 and not row.group_viable  # the root port counts as a member
    (group,) = [f for f in row.findings if f.check == "group"]
    assert "snd_hda_intel" in group.message and "xhci_hcd" in group.message and "0000:00:01.1" not in group.message
    assert group.fix == f"hearth vfio bind {WORKSTATION_GPU} (binds the card's other functions too)"


def test_gpu_sharing_a_group_with_a_nic_names_the_nic(tmp_path):
    gpu_with_nic(tmp_path)
    report = host_report(HostRoot(tmp_path), nvml=FakeNvml())
    (group,) = [f for f in report.gpus[0].findings if f.check == "group"]
    assert SHARED_NIC in group.message and "mlx5_core" in group.message and "ACS" in group.fix


def test_iommu_off_is_an_error_with_the_kernel_parameter(tmp_path):
    iommu_off(tmp_path)
    report = host_report(HostRoot(tmp_path), nvml=FakeNvml())
    (iommu,) = [f for f in report.host if f.check == "iommu"]
    assert iommu.severity == "error" and "IOMMU is off" in iommu.message
    assert "intel_iommu=on iommu=pt" in iommu.fix
    (modules,) = [f for f in report.host if f.check == "modules"]
    assert "vfio, vfio_pci, vfio_iommu_type1" in modules.message and "modprobe -a" in modules.fix
    assert [f.check for f in report.gpus[0].findings] == ["group"]
    assert report.exit_code == 2


def test_gpu_already_on_vfio_pci_is_ready_once_recorded(tmp_path):
    tree = hgx_h100(tmp_path, gpu_driver="vfio-pci")
    host = HostRoot(tmp_path)
    report = host_report(host)
    gpu = next(g for g in report.gpus if g.device.address == HGX_GPUS[0])
    assert gpu.group_viable and gpu.dev_vfio.present and gpu.dev_vfio.mode == "0600"
    assert [f.check for f in gpu.findings] == ["persist"]  # bound, but nothing re-binds it at boot
    write_record(host, {a: "10de:2330" for a in HGX_GPUS})
    gpu = next(g for g in host_report(host).gpus if g.device.address == HGX_GPUS[0])
    assert [(f.check, f.severity) for f in gpu.findings] == [("ready", "ok")]
    assert host_report(host).exit_code == 0
    # a vfio-pci binding made with modprobe options counts too
    os.unlink(tmp_path / "etc/hearth/vfio-pci.conf")
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/vfio.conf").write_text("options vfio-pci ids=10de:2330,10de:22a3\n")
    gpu = next(g for g in host_report(host).gpus if g.device.address == HGX_GPUS[0])
    assert gpu.boot_binding == "vfio-pci ids= in /etc/modprobe.d/vfio.conf"
    assert tree.current(HGX_GPUS[0]) == "vfio-pci"


def test_gpus_left_out_of_the_record_are_kept_for_the_host(tmp_path):
    hgx_h100(tmp_path)
    host = HostRoot(tmp_path)
    write_record(host, {HGX_GPUS[0]: "10de:2330"})
    report = host_report(host, nvml=FakeNvml())
    flagged = {g.device.address for g in report.gpus if any(f.is_problem for f in g.findings)}
    assert flagged == {HGX_GPUS[0]}


def test_unsafe_interrupts_and_missing_dev_vfio_are_errors(tmp_path):
    tree = hgx_h100(tmp_path, gpu_driver="vfio-pci")
    (tree.sys / "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts").write_text("Y\n")
    os.unlink(tmp_path / "dev/vfio" / str(tree.group(HGX_GPUS[1])))
    report = host_report(HostRoot(tmp_path))
    assert any(f.check == "interrupts" and f.severity == "error" for f in report.host)
    gpu = next(g for g in report.gpus if g.device.address == HGX_GPUS[1])
    assert any(f.check == "dev-vfio" and f.severity == "error" for f in gpu.findings)


def test_holders_of_the_gpu_device_file_are_named(tmp_path):
    tree = hgx_h100(tmp_path)
    tree.process(4242, "python", ["/dev/null", "/dev/nvidia3", "/dev/nvidiactl"])
    tree.process(4343, "nvidia-smi", ["/dev/nvidia5"])
    report = host_report(HostRoot(tmp_path), nvml=FakeNvml())
    held = {g.device.address: [str(h) for h in g.holders] for g in report.gpus if g.holders}
    assert held == {HGX_GPUS[3]: ["pid 4242 (python) holds /dev/nvidia3"],
                    HGX_GPUS[5]: ["pid 4343 (nvidia-smi) holds /dev/nvidia5"]}


def test_names_come_from_the_hosts_pci_ids(tmp_path):
    hgx_h100(tmp_path)
    (tmp_path / "usr/share/misc").mkdir(parents=True)
    (tmp_path / "usr/share/misc/pci.ids").write_text(
        "# pci.ids\n10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB] (from pci.ids)\n"
        "\t\t10de 16c1  H100 SXM5 80GB\n15b3  Mellanox Technologies\n\t1021  MT2910 Family [ConnectX-7]\n"
        "C 00  Unclassified device\n")
    topology = PciTopology(HostRoot(tmp_path))
    assert topology.devices[HGX_GPUS[0]].name == "GH100 [H100 SXM5 80GB] (from pci.ids)"
    assert topology.devices["0000:19:00.0"].name == "MT2910 Family [ConnectX-7]"
    assert topology.devices[HGX_NVSWITCHES[0]].name == "GH100 [H100 NVSwitch]"  # not in this pci.ids
