"""A VM config fit for big GPUs (ch/gpuvm.py), on sysfs trees with real H100 and L40S BARs and NUMA layouts (see
hosts.py): 1 GiB hugepages on the GPUs' NUMA node when free (prefaulted), a visible fallback when not, vCPUs pinned
there, PCI segments whose apertures hold the BARs, and every refusal before a VMM starts, with its fix. Every body
is validated against Cloud Hypervisor's spec and against the rules of CH's own config validation that the
stand-in replays; the host agent is run on the cloud-hypervisor STAND-IN."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from conftest import STANDIN
from hosts import GIB, HGX_GPUS, L40S_GPUS, hgx_h100, l40s_server
from hosttree import FakeKernel
from provisioner.agent.auth import Caller
from provisioner.agent.host import AgentConfig, CreateVm, HostAgent
from provisioner.ch import spec
from provisioner.ch.config import GpuGroup, vm_config, vm_spec
from provisioner.ch.gpuvm import GpuFacts, HostFacts, Memlock, plan
from provisioner.ch.standin import _invalid, _memory_problem, passed_gpus
from provisioner.errors import AgentError
from vfio.bars import address_bits, read_bars
from vfio.bind import apply, plan_bind
from vfio.hostroot import HostRoot
from vfio.numa import free_hugepages_1g, numa_nodes
from vfio.pci import PciTopology

NODE0_CPUS = list(range(0, 56)) + list(range(112, 168))
NODE1_CPUS = list(range(56, 112)) + list(range(168, 224))


def facts(root: Path, gpus: list[str], memlock: Memlock = Memlock(can_lock=True, limit=None)) -> HostFacts:
    """What the host agent reads for a VM with these GPUs (agent/host.py, `_layout`)."""
    host = HostRoot(root)
    topology = PciTopology(host)
    return HostFacts(gpus={a: GpuFacts(address=a, device=topology.devices[a].ids, name=topology.devices[a].name,
                                       numa=topology.devices[a].numa_node, bars={a: read_bars(host, a)}) for a in gpus},
                     nodes=numa_nodes(host), free_hugepages=free_hugepages_1g(host), address_bits=address_bits(host),
                     memlock=memlock)


def body(root: Path, files: dict, gpus: list[str], layout, cpus: int, memory_mib: int) -> dict:
    """The vm.create body for that layout, checked against the spec and CH's own validation rules."""
    node = vm_spec(node_id="gpu-0", kernel=files["vmlinuz"], initramfs=files["initrd.img"], image=files["rootfs.img"],
                   cpus=cpus, memory_mib=memory_mib, sysfs_root=root, layout=layout,
                   gpus=[GpuGroup(address=a, clique=0 if len(gpus) > 1 else None) for a in gpus])
    config = vm_config(node, vsock_socket=Path("/run/hearth/vms/gpu-0/vsock.sock"),
                       serial_log=Path("/run/hearth/vms/gpu-0/serial.log"))
    assert spec.errors("VmConfig", config) == []
    assert _invalid(config) is None and _memory_problem(config) is None
    return config


def test_one_h100_gets_hugepages_cpus_and_an_aperture_on_its_numa_node(tmp_path, vm_files):
    root = tmp_path / "hgx"
    hgx_h100(root)
    for gpu, node, cpus in ((HGX_GPUS[0], 0, NODE0_CPUS), (HGX_GPUS[5], 1, NODE1_CPUS)):
        layout = plan(node="gpu-0", memory_mib=64 * 1024, cpus=16, gpus=[gpu], facts=facts(root, [gpu]))
        config = body(root, vm_files, [gpu], layout, 16, 64 * 1024)
        assert config["memory"] == {"size": 0, "zones": [{"id": "mem0", "size": 64 * GIB, "hugepages": True,
                                                          "hugepage_size": GIB, "prefault": True,
                                                          "host_numa_node": node}]}
        assert config["cpus"]["affinity"] == [{"vcpu": v, "host_cpus": cpus} for v in range(16)]
        assert "numa" not in config  # one host node: nothing to tell the guest
        assert config["platform"]["num_pci_segments"] == 2
        segments = {s["pci_segment"]: s for s in config["pci_segments"]}
        assert segments[1]["mmio64_aperture_weight"] > segments[0]["mmio64_aperture_weight"] == 1
        assert layout.segments[1].window64 >= 2 * 128 * GIB  # room for the 128 GiB BAR, naturally aligned
        assert layout.hugepages == [(node, 64)] and layout.warnings == []
        described = layout.describe()
        assert f"memory 64 GiB on NUMA node {node} from 1 GiB hugepages, prefaulted" in described
        assert "16 MiB + 128 GiB + 32 MiB" in described and "46-bit" in described


def test_eight_h100s_across_two_sockets_get_a_zone_and_vcpus_on_each(tmp_path, vm_files):
    root = tmp_path / "hgx"
    hgx_h100(root)
    layout = plan(node="gpu-0", memory_mib=1536 * 1024, cpus=96, gpus=HGX_GPUS, facts=facts(root, HGX_GPUS))
    config = body(root, vm_files, HGX_GPUS, layout, 96, 1536 * 1024)
    zones = config["memory"]["zones"]
    assert [(z["size"], z["host_numa_node"], z["hugepages"]) for z in zones] == [(768 * GIB, 0, True), (768 * GIB, 1, True)]
    affinity = {a["vcpu"]: a["host_cpus"] for a in config["cpus"]["affinity"]}
    assert all(affinity[v] == NODE0_CPUS for v in range(48)) and all(affinity[v] == NODE1_CPUS for v in range(48, 96))
    assert config["numa"] == [
        {"guest_numa_id": 0, "cpus": list(range(48)), "memory_zones": ["mem0"], "pci_segments": [0, 1, 2, 3, 4]},
        {"guest_numa_id": 1, "cpus": list(range(48, 96)), "memory_zones": ["mem1"], "pci_segments": [5, 6, 7, 8]}]
    assert [d["pci_segment"] for d in config["devices"]] == list(range(1, 9))
    assert all(d["x_nv_gpudirect_clique"] == 0 for d in config["devices"])
    assert all(s.window64 >= 256 * GIB for s in layout.segments[1:])


def test_l40s_32_bit_bars_and_64_bit_bars_have_their_apertures(tmp_path, vm_files):
    root = tmp_path / "l40s"
    l40s_server(root, hugepages_1g=400)
    layout = plan(node="gpu-0", memory_mib=256 * 1024, cpus=32, gpus=L40S_GPUS, facts=facts(root, L40S_GPUS))
    config = body(root, vm_files, L40S_GPUS, layout, 32, 256 * 1024)
    assert [(z["size"], z["host_numa_node"]) for z in config["memory"]["zones"]] == [(128 * GIB, 0), (128 * GIB, 1)]
    assert config["cpus"]["affinity"][0]["host_cpus"] == list(range(0, 32)) + list(range(64, 96))
    for segment in layout.segments[1:]:
        assert segment.window32 >= 2 * 16 << 20 and segment.window64 >= 2 * 64 * GIB
    assert "64 GiB + 32 MiB" in layout.describe() and "32-bit" in layout.describe()


def test_without_free_hugepages_on_the_gpus_node_it_falls_back_and_says_so(tmp_path, vm_files):
    root = tmp_path / "hgx"
    tree = hgx_h100(root)
    tree.hugepages(900, 10)  # node 1 has only 10 free
    layout = plan(node="gpu-0", memory_mib=64 * 1024, cpus=8, gpus=[HGX_GPUS[4]], facts=facts(root, [HGX_GPUS[4]]))
    config = body(root, vm_files, [HGX_GPUS[4]], layout, 8, 64 * 1024)
    assert config["memory"]["zones"] == [{"id": "mem0", "size": 64 * GIB, "host_numa_node": 1}]  # still NUMA-local
    assert layout.hugepages == []
    (warning,) = layout.warnings
    assert "4 KiB pages, not 1 GiB hugepages: NUMA node 1 has 10 free 1 GiB hugepages, the VM needs 64" in warning
    assert "hugepages-1048576kB/nr_hugepages" in warning
    assert layout.describe().endswith(f"warning: {warning}")
    # the pages other VMs were promised while booting count as taken
    promised = plan(node="gpu-1", memory_mib=64 * 1024, cpus=8, gpus=[HGX_GPUS[0]], facts=facts(root, [HGX_GPUS[0]]),
                    promised={0: 850})
    assert promised.hugepages == [] and "(850 promised to VMs still booting)" in promised.warnings[0]
    # memory that is not whole GiB cannot come from 1 GiB pages
    odd = plan(node="gpu-2", memory_mib=6000, cpus=8, gpus=[HGX_GPUS[0]], facts=facts(root, [HGX_GPUS[0]]))
    assert "its memory (6000 MiB) is not a whole number of GiB" in odd.warnings[0]
    body(root, vm_files, [HGX_GPUS[0]], odd, 8, 6000)
    off = plan(node="gpu-3", memory_mib=8192, cpus=8, gpus=[HGX_GPUS[0]], facts=facts(root, [HGX_GPUS[0]]),
               hugepages="off")
    assert off.warnings == [] and not off.zones[0].hugepages  # asked for: nothing to warn of


def test_a_gpu_whose_numa_node_is_unknown_is_not_pinned_and_says_so(tmp_path, vm_files):
    root = tmp_path / "hgx"
    hgx_h100(root)
    (root / "sys/bus/pci/devices" / HGX_GPUS[0] / "numa_node").write_text("-1\n")
    layout = plan(node="gpu-0", memory_mib=16 * 1024, cpus=4, gpus=[HGX_GPUS[0]], facts=facts(root, [HGX_GPUS[0]]))
    config = body(root, vm_files, [HGX_GPUS[0]], layout, 4, 16 * 1024)
    assert "affinity" not in config["cpus"] and "host_numa_node" not in config["memory"]["zones"][0]
    assert config["memory"]["zones"][0]["hugepages"]  # from the host's whole pool
    assert "NUMA node of 0000:18:00.0 unknown" in layout.warnings[0] and "4 vCPUs, not pinned" in layout.describe()


@pytest.mark.parametrize("case, words", [
    ("require", "must come from 1 GiB hugepages (the agent runs with --hugepages require), but NUMA node 0 has 0 "
                "free 1 GiB hugepages, the VM needs 64 there. Fix: reserve more"),
    ("memlock", "its VMM could pin only 8 MiB of its 64 GiB of guest memory (RLIMIT_MEMLOCK, which cloud-hypervisor "
                "inherits from the agent, without CAP_IPC_LOCK); VFIO pins all guest memory at vm.boot and would fail "
                "with ENOMEM. Fix: LimitMEMLOCK=infinity"),
    ("address bits", "its GPUs' BARs do not fit the guest's physical address space: 4 GPU(s) with 512.2 GiB of "
                     "64-bit BARs (the largest 128 GiB, which needs a 128 GiB-aligned hole)"),
])
def test_every_refusal_names_the_fix(tmp_path, case, words):
    root = tmp_path / "hgx"
    hgx_h100(root, hugepages_1g=0, address_bits=39 if case == "address bits" else 46)
    gpus = HGX_GPUS[:4] if case == "address bits" else HGX_GPUS[:1]
    memlock = Memlock(can_lock=False, limit=8 << 20) if case == "memlock" else Memlock(can_lock=True, limit=None)
    with pytest.raises(AgentError) as refused:
        plan(node="gpu-0", memory_mib=64 * 1024, cpus=8, gpus=gpus, facts=facts(root, gpus, memlock),
             hugepages="require" if case == "require" else "auto")
    assert words in str(refused.value)
    assert str(refused.value).startswith("node gpu-0: ")


def test_apertures_are_weighted_where_chs_equal_split_would_not_hold_the_bar(tmp_path, vm_files):
    """A CPU with 39 physical address bits (512 GiB): split equally, the GPU's segment would get a window with
    no 128 GiB-aligned hole for BAR2; weighted, it does."""
    from provisioner.ch.gpuvm import _apertures, _fits, _windows  # the replay of CH's placement

    root = tmp_path / "small"
    hgx_h100(root, hugepages_1g=128, address_bits=39)
    gpu = HGX_GPUS[0]
    host = facts(root, [gpu])
    layout = plan(node="gpu-0", memory_mib=64 * 1024, cpus=8, gpus=[gpu], facts=host)
    body(root, vm_files, [gpu], layout, 8, 64 * 1024)
    start, end = 4 * GIB + 61 * GIB, (1 << 39) - (64 << 10) - (1 << 20) - 1
    bars = [b for b in read_bars(HostRoot(root), gpu)]
    equal = _windows(start, end, [1, 1], 4 * GIB)
    assert not _fits(equal[1], bars, 4096)
    weights = [s.mmio64_weight for s in layout.segments]
    assert _fits(_windows(start, end, weights, 4 * GIB)[1], bars, 4096) and weights[1] > 1
    assert _apertures("n", 64 * GIB, [gpu], host, 39) == layout.segments


def test_standin_refuses_what_chs_validation_refuses(tmp_path, vm_files):
    root = tmp_path / "hgx"
    hgx_h100(root)
    layout = plan(node="gpu-0", memory_mib=64 * 1024, cpus=96, gpus=HGX_GPUS, facts=facts(root, HGX_GPUS))
    good = body(root, vm_files, HGX_GPUS, layout, 96, 64 * 1024)
    cases = {
        "Default PCI segment assigned to non-default NUMA node 1":
            lambda c: c["numa"][1]["pci_segments"].append(0),
        "Invalid PCI segment id: 9": lambda c: c["pci_segments"].append({"pci_segment": 9}),
        "Memory zone mem0 reused": lambda c: c["numa"][1]["memory_zones"].append("mem0"),
        "Huge page size specified but huge pages not enabled":
            lambda c: c["memory"]["zones"][0].update(hugepages=False),
        "Invalid PCI segment aperture weight: 0": lambda c: c["pci_segments"][1].update(mmio64_aperture_weight=0),
    }
    for words, change in cases.items():
        config = json.loads(json.dumps(good))
        change(config)
        assert _invalid(config) == words or words in (_invalid(config) or ""), (words, _invalid(config))
    assert "must be provided if the memory size is 0" in _memory_problem({"memory": {"size": 0}})
    assert "can't be provided if the memory size is not 0" in _memory_problem({"memory": {"size": GIB, "zones": []}})
    assert "Unknown memory zone 'mem7'" in _memory_problem({**good, "numa": [{"guest_numa_id": 0, "memory_zones": ["mem7"]}]})


def test_the_agent_lays_out_gpu_vms_refuses_before_leasing_and_reports_nvswitches(tmp_path, run_dir):
    """The host agent in-process, on the stand-in: a one-GPU VM and an eight-GPU VM on an HGX tree with Fabric
    Manager stopped, then running; the layout in the booting event and in vm.create's body; hugepages promised
    to a booting VM are not promised twice; `--hugepages require` refuses before anything is leased."""
    from provisioner.ch.api import ChClient

    root = tmp_path / "hgx"
    tree = hgx_h100(root, hugepages_1g=200)  # 100 per node
    with FakeKernel(tree):
        apply(HostRoot(root), plan_bind(HostRoot(root), HGX_GPUS, nvml=None))
    image = tmp_path / "image"
    image.mkdir()
    for part in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / part).write_bytes(b"\0" * 4096)

    def request(vm: str, gpus: list[str], memory_gib: int) -> CreateVm:
        return CreateVm(controller="c1", budget_s=30, node={
            "id": vm, "uid": vm, "host": "h", "image": str(image), "cpus": 8, "memory_mib": memory_gib * 1024,
            "ray": {"address": "127.0.0.1:1", "token": "not-a-secret"}, "gpus": [{"address": a} for a in gpus]},
            standin={"boot_s": 0.5, "guest": "builtin"})

    ROOT = Caller(uid=0)  # root, by hand: the agent opens controller c1's lease for it

    async def scenario(policy: str) -> dict:
        agent = HostAgent(AgentConfig(host_root=root, state_dir=tmp_path / f"state-{policy}", run_dir=run_dir / policy,
                                      cloud_hypervisor=STANDIN, hugepages=policy))
        await agent.start()
        seen = {}
        try:
            if policy == "require":
                with pytest.raises(AgentError, match="--hugepages require"):
                    await agent.create_vm("big", request("big", HGX_GPUS[:4], 128), ROOT)
                seen["leased"] = dict(agent.ledger.vms)
                return seen
            # two VMs booting at once on node 0: 60 + 60 GiB of its 100 free pages
            first, second = await asyncio.gather(agent.create_vm("one", request("one", HGX_GPUS[:1], 60), ROOT),
                                                 agent.create_vm("two", request("two", HGX_GPUS[1:2], 60), ROOT))
            seen["one"], seen["two"] = first, second
            client = ChClient(str(run_dir / policy / "one" / "api.sock"))
            seen["config"] = (await client.info()).config
            await client.aclose()
            (root / "usr/share/nvidia/nvswitch").mkdir(parents=True)
            (root / "usr/share/nvidia/nvswitch/fabricmanager.cfg").write_text("LOG_LEVEL=4\nFABRIC_MODE=1\n")
            tree.process(4242, "nv-fabricmanage", [])
            seen["eight"] = await agent.create_vm("eight", request("eight", HGX_GPUS[2:8], 8), ROOT)
            seen["promised"] = dict(agent._promised)
            for vm in ("one", "two", "eight"):
                deadline = time.monotonic() + 20
                while agent.vm(vm)["state"] != "ray_joined" and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                seen[f"{vm}-state"] = agent.vm(vm)["state"]
            await agent.release("c1")
        finally:
            await agent.close()
        return seen

    seen = asyncio.run(scenario("auto"))
    booting = {vm: next(e["detail"] for e in seen[vm]["events"] if e["state"] == "booting") for vm in ("one", "two")}
    hugepaged = [vm for vm, detail in booting.items() if "from 1 GiB hugepages, prefaulted" in detail]
    assert len(hugepaged) == 1, booting  # 100 free pages on node 0 hold one 60 GiB VM, not two
    (other,) = {"one", "two"} - set(hugepaged)
    assert "warning: guest memory from 4 KiB pages" in booting[other] and "promised to VMs still booting" in booting[other]
    assert "NVSwitches: 4 stay with the host (VMs get GPUs only); Fabric Manager is not installed" in booting["one"]
    zone = seen["config"]["memory"]["zones"][0]
    assert zone["host_numa_node"] == 0 and zone["size"] == 60 * GIB
    assert seen["config"]["cpus"]["affinity"][0]["host_cpus"] == NODE0_CPUS
    eight = next(e["detail"] for e in seen["eight"]["events"] if e["state"] == "booting")
    assert "Fabric Manager runs, FABRIC_MODE=1 (shared NVSwitch)" in eight and "warning: NVLink" not in eight
    assert seen["eight"]["layout"]["zones"][0]["host_numa_node"] == 1  # four of its six GPUs are on node 1
    assert seen["promised"] == {}  # every VM had booted
    assert all(seen[f"{vm}-state"] == "ray_joined" for vm in ("one", "two", "eight")), seen
    refused = asyncio.run(scenario("require"))
    assert refused["leased"] == {}


def test_multi_gpu_vm_without_fabric_manager_is_warned(tmp_path):
    from provisioner.agent.host import _nvswitch_text
    from vfio.fabric import fabric_manager

    root = tmp_path / "hgx"
    hgx_h100(root)
    fabric = fabric_manager(HostRoot(root))
    assert not fabric.installed and not fabric.running and fabric.evidence == "nothing"
    assert "NVLink between a VM's GPUs needs it running with FABRIC_MODE=1" in _nvswitch_text(4, fabric)
    (root / "run/systemd/units").mkdir(parents=True)
    (root / "run/systemd/units/invocation:nvidia-fabricmanager.service").symlink_to("0123abcd")
    (root / "usr/share/nvidia/nvswitch").mkdir(parents=True)
    (root / "usr/share/nvidia/nvswitch/fabricmanager.cfg").write_text("FABRIC_MODE=0\n")
    fabric = fabric_manager(HostRoot(root))
    assert fabric.running and fabric.mode == 0 and not fabric.shared_nvswitch
    assert fabric.describe() == "Fabric Manager runs, FABRIC_MODE=0 (bare metal / full passthrough)"


def test_standin_passes_the_gpus_among_its_vfio_devices(tmp_path):
    root = tmp_path / "l40s"
    l40s_server(root)
    config = {"devices": [{"path": f"{root}/sys/bus/pci/devices/{a}/", "pci_segment": 1 + i}
                          for i, a in enumerate(L40S_GPUS[:2])]}
    assert passed_gpus(config) == [{"address": "0001:00:01.0", "device": "10de:26b9"},
                                   {"address": "0002:00:01.0", "device": "10de:26b9"}]


def test_hosts_check_warns_of_gpus_the_images_driver_does_not_list(tmp_path):
    from provisioner.agent.check import warnings

    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.json").write_text(json.dumps({"inputs": {"nvidia": {"driver": "535.261.03", "modules": "open"}}}))
    (image / "supported-gpus.json").write_text(json.dumps({"chips": [
        {"devid": "0x2330", "name": "NVIDIA H100 80GB HBM3", "features": ["kernelopen"]},
        {"devid": "0x1DB1", "name": "Tesla V100-SXM2-16GB", "features": []}]}))
    info = {"gpus": {"models": {"10de:2330": {"name": "GH100 [H100 SXM5 80GB]", "count": 4},
                                "10de:2335": {"name": "GH100 [H200 SXM 141GB]", "count": 2},
                                "10de:1db1": {"name": "GV100GL [Tesla V100 SXM2 16GB]", "count": 1}}},
            "nvswitches": {"count": 0}}
    assert warnings(info, image) == [
        "1 x GV100GL [Tesla V100 SXM2 16GB] (10de:1db1): Tesla V100-SXM2-16GB (0x1DB1) is not supported by the open "
        "kernel modules of 535.261.03: build with --nvidia-modules proprietary",
        "2 x GH100 [H200 SXM 141GB] (10de:2335): NVIDIA's list for 535.261.03 does not name device 0x2335"]
    assert warnings(info, None) == []  # no image named: nothing to compare with
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "manifest.json").write_text(json.dumps({"inputs": {}}))
    assert all("has no NVIDIA driver: build it with `hearth guest build --nvidia-driver 550`" in w
               for w in warnings(info, plain))
