"""A node's GPUs, checked twice: the guest agent reads its GPUs through NVML (here a STAND-IN with pynvml's call
shapes, tests/fakenvml.py, handed to it as a real VM's agent gets nvidia-ml-py), turns persistence mode on, and
refuses GPUs other than those its VM was given; the node's side (GuestLink, wherever the VM's driver runs)
compares the guest's report with the lease (count and PCI device id) and fails the node with the guest's words.
Nothing here loads a driver or touches this host's GPUs: the driver path under a real kernel is booted in
test_guest_nvidia.py."""

from __future__ import annotations

import json
import threading
import time

import pytest

from fakenvml import NVML_ERROR_GPU_IS_LOST, NVML_ERROR_NO_PERMISSION, FakeNvml
from guest import agent
from hosts import HGX_GPUS, hgx_h100
from provisioner.events import NodeHistory, NodeState, NodeTracker
from provisioner.guest_channel import GuestLink, compare_gpus
from provisioner.node import ExpectedGpu
from test_guest_agent import host_end, hosted  # noqa: F401 - the hosted guest agent's harness (host_end: a fixture)

H100 = {"address": "0000:00:05.0", "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-3b1c2e4f-0000-4000-8000-000000000001",
        "device": 0x2330, "memory": 81559 << 20}
L40S = {"address": "0000:00:06.0", "name": "NVIDIA L40S", "uuid": "GPU-3b1c2e4f-0000-4000-8000-000000000002",
        "device": 0x26B9, "memory": 46068 << 20, "ecc": None}


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """The kernel's NVRM lines come from the guest's /dev/kmsg: here, a stand-in's."""
    monkeypatch.setattr(agent, "kernel_words", lambda limit=8: ["NVRM: GPU 0000:00:05.0: RmInitAdapter failed! (0x62:0x40:2153)"])


def test_nvml_reading_gives_each_gpu_and_turns_persistence_on():
    nvml = FakeNvml([dict(H100), dict(L40S, persistence_error=NVML_ERROR_NO_PERMISSION)])
    version, gpus = agent.read_gpus(nvml)
    assert version == "570.124.06"
    assert gpus == [
        {"address": "0000:00:05.0", "device": "10de:2330", "name": "NVIDIA H100 80GB HBM3", "uuid": H100["uuid"],
         "memory_mib": 81559, "ecc": "on", "persistence": True},
        {"address": "0000:00:06.0", "device": "10de:26b9", "name": "NVIDIA L40S", "uuid": L40S["uuid"],
         "memory_mib": 46068, "ecc": "n/a", "persistence": False, "persistence_error": "Insufficient Permissions"}]
    assert nvml.calls.count("nvmlInit") == nvml.calls.count("nvmlShutdown") == 1
    assert "nvmlDeviceSetPersistenceMode 0000:00:05.0 1" in nvml.calls
    report = {"gpus": gpus, "driver": version, "problem": None, "seconds": 9.2}
    assert agent.gpu_summary(report) == (
        "GPUs: 1 x NVIDIA H100 80GB HBM3 (10de:2330, 81559 MiB, ECC on, persistence on); 1 x NVIDIA L40S (10de:26b9, "
        "46068 MiB, ECC n/a, persistence off), driver 570.124.06 in 9.2 s")


def test_nvml_that_fails_or_hangs_is_reported_with_the_kernels_words():
    version, gpus, problem = agent.read_bounded(lambda: FakeNvml([H100], fail_init=NVML_ERROR_GPU_IS_LOST), 5)
    assert (version, gpus) == (None, [])
    assert problem == "NVML: NVMLError: GPU is lost | NVRM: GPU 0000:00:05.0: RmInitAdapter failed! (0x62:0x40:2153)"
    stuck = threading.Event()

    class Hanging(FakeNvml):
        def nvmlInit(self):
            stuck.wait(30)

    started = time.monotonic()
    _, _, problem = agent.read_bounded(lambda: Hanging([H100]), 0.3)
    stuck.set()
    assert time.monotonic() - started < 5 and problem.startswith("NVML did not answer within 0.3 s | NVRM: ")


def test_the_guest_finds_nvidia_gpus_on_its_pci_bus(tmp_path):
    hgx_h100(tmp_path / "root")
    found = agent.pci_gpus(str(tmp_path / "root/sys"))
    assert [g["address"] for g in found] == sorted(HGX_GPUS) and {g["device"] for g in found} == {"10de:2330"}
    assert agent.pci_gpus(str(tmp_path / "nothing")) == []
    assert agent.gpu_report([], lambda: FakeNvml()) == {"gpus": [], "driver": None, "problem": None, "seconds": None}
    assert agent.gpu_summary({"gpus": [], "driver": None, "problem": None, "seconds": None}) == "no NVIDIA GPU"
    assert agent.pci_address("00000001:3B:00.0") == "0001:3b:00.0"


class Machine:
    @staticmethod
    def no_gpu_words() -> str:
        return "modprobe: ERROR: could not insert 'nvidia': No such device | NVRM: No NVIDIA GPU found."


@pytest.mark.parametrize("expected, found, problem, words", [
    (["10de:2330"], ["10de:2330"], None, None),
    ([], [], None, None),
    (["10de:2330", "10de:2330"], ["10de:2330"], None,
     "GPUs: the node was given 2 (2 x 10de:2330), the guest found 1 (1 x 10de:2330)"),
    (["10de:2330"], ["10de:2335"], None, "GPUs: the node was given 1 (1 x 10de:2330), the guest found 1 (1 x 10de:2335)"),
    (["10de:2330"], [], None, "GPUs: the node was given 1 (1 x 10de:2330), the guest found 0 (none); the driver says: "
                              "modprobe: ERROR: could not insert 'nvidia': No such device | NVRM: No NVIDIA GPU found."),
    (["10de:2330"], ["10de:2330"], "modprobe: FATAL: Module nvidia not found",
     "GPUs: the driver did not come up: modprobe: FATAL: Module nvidia not found"),
])
def test_the_guest_refuses_gpus_other_than_its_vms(expected, found, problem, words):
    report = {"gpus": [{"address": f"0000:00:0{5 + i}.0", "device": d} for i, d in enumerate(found)], "driver": None,
              "problem": problem, "seconds": None}
    assert agent.gpu_refusal([{"address": HGX_GPUS[i], "device": d} for i, d in enumerate(expected)], report,
                             Machine) == words


def link(expected: list[str]) -> tuple[GuestLink, NodeHistory]:
    history = NodeHistory("n-0")
    tracker = NodeTracker(history)
    for state in (NodeState.requested, NodeState.placed, NodeState.vmm_started, NodeState.booting):
        tracker.transition(state)
    reading = GuestLink(tracker)
    reading.expected = [ExpectedGpu(address=HGX_GPUS[i], device=d) for i, d in enumerate(expected)]
    return reading, history


def hello(*devices: str, problem: str | None = None, gpu_s: float | None = 8.5) -> dict:
    phases = {"kernel_s": 1.0, "agent_s": 10.0, **({"gpu_s": gpu_s} if gpu_s is not None else {})}
    return {"op": "hello", "node": "n-0", "detail": "guest agent up", "phases": phases, "gpu_problem": problem,
            "gpus": [{"address": f"0000:00:0{5 + i}.0", "device": d} for i, d in enumerate(devices)]}


READY = {"op": "ready", "phases": {"config_s": 10.1, "ray_s": 14.0}}


def test_the_node_compares_what_the_guest_reports_with_its_lease():
    # match: the node joins; the GPU driver is a phase of its boot, out of the agent's
    reading, history = link(["10de:2330", "10de:2330"])
    reading.on_message(hello("10de:2330", "10de:2330"))
    reading.on_message(READY)
    assert history.state == NodeState.ray_joined
    assert reading.profile["gpu driver"] == 8.5 and reading.profile["agent"] == 0.5 and reading.profile["kernel"] == 1.0
    # wrong count: the guest says why after its config, with the driver's words, and that is the node's reason
    reading, history = link(["10de:2330", "10de:2330"])
    reading.on_message(hello("10de:2330"))
    assert history.state == NodeState.guest_up
    reading.on_message({"op": "failed", "detail": "GPUs: the node was given 2 (2 x 10de:2330), the guest found 1 "
                                                  "(1 x 10de:2330)"})
    assert history.state == NodeState.failed
    assert history.events[-1].detail == ("the guest agent: GPUs: the node was given 2 (2 x 10de:2330), the guest "
                                         "found 1 (1 x 10de:2330)")
    # wrong device id, the driver's words in the hello: failed at once
    reading, history = link(["10de:2330"])
    reading.on_message(hello("10de:2335", problem="NVRM: GPU 0000:00:05.0: RmInitAdapter failed!"))
    assert history.state == NodeState.failed and history.events[-1].detail == (
        "the guest agent: GPUs: the node was given 1 (1 x 10de:2330), the guest found 1 (1 x 10de:2335): "
        "NVRM: GPU 0000:00:05.0: RmInitAdapter failed!")
    # a guest agent too old to refuse: the node fails at its ready, with the comparison's words
    reading, history = link(["10de:2330"])
    reading.on_message(hello(gpu_s=None))
    reading.on_message(READY)
    assert history.state == NodeState.failed
    assert history.events[-1].detail.startswith("GPUs: the node was given 1 (1 x 10de:2330), the guest found 0 (none)")
    assert compare_gpus([], [{"device": "10de:2330"}]) == "GPUs: the node was given 0 (none), the guest found 1 (1 x 10de:2330)"


def test_a_hosted_guest_reports_the_gpus_its_standin_passed_and_refuses_others(run_dir, host_end):
    passed = [{"address": "0001:00:01.0", "device": "10de:2330"}]
    guest = hosted(run_dir, HEARTH_GUEST_GPUS=json.dumps(passed))
    host_end.accept()
    said = host_end.expect("hello")
    assert said["gpus"] == [{**passed[0], "name": "simulated by cloud-hypervisor-standin"}]
    assert "gpu_s" not in said["phases"] and "GPUs: 1 x simulated by cloud-hypervisor-standin (10de:2330)" in said["detail"]
    host_end.config(gpus=[{"address": HGX_GPUS[0], "device": "10de:2330"}, {"address": HGX_GPUS[1], "device": "10de:2330"}])
    failed = host_end.expect("failed")
    assert failed["detail"] == "GPUs: the node was given 2 (2 x 10de:2330), the guest found 1 (1 x 10de:2330)"
    guest.wait(30)


def test_the_gpu_path_in_order_with_the_drivers_steps_stood_in(monkeypatch):
    """`gpu_report` as a VM's agent runs it, the steps that need a kernel with the driver (modprobe, the driver's
    probe, mknod) replaced: NVML's view is the report, and GPUs NVML does not list are the driver's problem."""
    steps = []
    monkeypatch.setattr(agent, "load_driver", lambda: steps.append("modprobe") or None)
    monkeypatch.setattr(agent, "wait_for_devices", lambda count, within: steps.append(f"wait for {count}") or None)
    monkeypatch.setattr(agent, "make_device_nodes", lambda: steps.append("mknod"))
    found = [{"address": "0000:00:05.0", "device": "10de:2330"}, {"address": "0000:00:06.0", "device": "10de:2330"}]
    both = [dict(H100), dict(H100, address="0000:00:06.0", uuid="GPU-2")]
    report = agent.gpu_report(found, lambda: FakeNvml(both))
    assert steps == ["modprobe", "wait for 2", "mknod"]
    assert report["problem"] is None and report["driver"] == "570.124.06" and report["seconds"] >= 0
    assert [g["uuid"] for g in report["gpus"]] == [H100["uuid"], "GPU-2"] and all(g["persistence"] for g in report["gpus"])
    short = agent.gpu_report(found, lambda: FakeNvml([dict(H100)]))
    assert short["gpus"] == found and short["problem"] == (
        "NVML lists 1 of the 2 NVIDIA GPUs on the PCI bus | NVRM: GPU 0000:00:05.0: RmInitAdapter failed! (0x62:0x40:2153)")
    monkeypatch.setattr(agent, "load_driver", lambda: "modprobe: FATAL: Module nvidia not found in directory "
                                                       "/lib/modules/6.1.0-57-cloud-amd64")
    unloaded = agent.gpu_report(found, lambda: FakeNvml(both))
    assert unloaded["problem"].startswith("modprobe: FATAL: Module nvidia not found") and unloaded["driver"] is None
    assert agent.gpu_summary(unloaded).startswith("NVIDIA GPUs 10de:2330 at 0000:00:05.0, 10de:2330 at 0000:00:06.0, "
                                                  "but the driver did not come up: modprobe: FATAL")


def test_hearth_up_prints_each_gpu_nodes_gpus_and_layout_warnings():
    from provisioner.cli import gpu_lines

    nodes = [{"id": "c-0", "events": [
        {"state": "booting", "detail": "memory 64 GiB on NUMA node 1 from 4 KiB pages; 8 vCPUs pinned to node 1's CPUs "
                                       "56-111; warning: guest memory from 4 KiB pages, not 1 GiB hugepages: NUMA node 1 "
                                       "has 10 free 1 GiB hugepages, the VM needs 64 there; VFIO pins every page. Fix: x"},
        {"state": "guest_up", "detail": "guest agent up 1.20 s after the kernel started; GPUs: 1 x NVIDIA H100 80GB HBM3 "
                                        "(10de:2330, 81559 MiB, ECC on, persistence on), driver 550.163.01 in 9.1 s"}]},
        {"id": "c-1", "events": [{"state": "guest_up", "detail": "guest agent up 1.1 s ...; no NVIDIA GPU (0.01 s to look)"}]}]
    assert gpu_lines(nodes) == [
        "c-0: warning: guest memory from 4 KiB pages, not 1 GiB hugepages: NUMA node 1 has 10 free 1 GiB hugepages, the "
        "VM needs 64 there; VFIO pins every page. Fix: x",
        "c-0: GPUs: 1 x NVIDIA H100 80GB HBM3 (10de:2330, 81559 MiB, ECC on, persistence on), driver 550.163.01 in 9.1 s"]
