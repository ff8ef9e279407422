"""The Cloud Hypervisor backend against the cloud-hypervisor-standin process (a STAND-IN: this machine
cannot run cloud-hypervisor). Where a real cloud-hypervisor binary is on PATH, the VM tests run against
it too."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import GUEST, SENT, STANDIN
from hosts import HGX_GPUS, hgx_h100
from hosttree import FakeKernel
from provisioner.ch import spec
from provisioner.ch.api import ChClient
from provisioner.ch.config import vm_config, vm_spec
from provisioner.ch.monitor import EventStream, format_event
from provisioner.ch.vm import ChVm
from provisioner.errors import SpecError, VmmApiError, VmmError, VmmExited, VmmTimeout
from provisioner.events import NodeState
from provisioner.net import tap_exists
from provisioner.node import GuestConfig, RayJoin
from vfio.bind import apply, plan_bind
from vfio.hostroot import HostRoot

REAL_CH = shutil.which("cloud-hypervisor")
BINARIES = [pytest.param(STANDIN, id="standin"), pytest.param(REAL_CH, id="cloud-hypervisor", marks=pytest.mark.skipif(
    REAL_CH is None, reason="no cloud-hypervisor binary on PATH (it is in neither Debian nor PyPI); "
    "the stand-in covers these tests"))]


def standin_env(**settings) -> dict[str, str]:
    return {"HEARTH_STANDIN": json.dumps({"boot_s": 0.05, "guest": GUEST, **settings})}


def make_vm(run_dir, vm_files, node="n0", binary=STANDIN, settings=None, **options) -> ChVm:
    fields = dict(node_id=node, kernel=vm_files["vmlinuz"], initramfs=vm_files["initrd.img"],
                  image=vm_files["rootfs.img"], memory_mib=512, vsock_cid=3 + int(node[1:] or 0))
    fields.update(options.pop("spec", {}))
    guest = GuestConfig(node=node, ray=RayJoin(address="10.0.0.1:6379", token="not-a-secret"))
    return ChVm(vm_spec(**fields), run_dir, guest, binary=binary, env=standin_env(**(settings or {})), **options)


def within(seconds: float = 30.0) -> float:
    """A boot deadline, as the engine gives one."""
    return time.monotonic() + seconds


def left_behind(vm: ChVm) -> list[str]:
    """What a stopped node must not leave: a live process or any socket/lock/disk it made."""
    found = []
    if vm.process is not None and vm.process.returncode is None:
        found.append(f"process {vm.process.pid}")
    if vm.dir.exists():
        found += [p.name for p in vm.dir.iterdir() if p.suffix not in (".log",)]
    return found


def test_packaged_spec_is_upstreams():
    data = spec.SPEC_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == spec.SPEC_SHA256
    shared = Path(__file__).parents[1] / "../shared/cloud-hypervisor/cloud-hypervisor.yaml"
    if shared.exists():
        assert shared.read_bytes() == data
    assert spec.spec()["info"]["version"] == "0.3.0"


def test_vm_config_for_a_gpu_node_validates_against_the_spec(vm_files):
    env = vm_files["rootfs.img"].with_name("env.img")
    env.write_bytes(b"\0" * 4096)
    node = vm_spec(node_id="sweep-7", kernel=vm_files["vmlinuz"], initramfs=vm_files["initrd.img"],
                   image=vm_files["rootfs.img"], env_disk=env, cpus=16, memory_mib=64 << 10, hugepages=True,
                   hugepage_size_mib=1024, tap="hth-sweep7", mac="52:54:00:ab:cd:07", host_ip="10.42.0.1",
                   vsock_cid=7, gpus=[{"address": "0000:18:00.0", "clique": 0},
                                      {"address": "00000000:01:00.0", "functions": ["0000:01:00.1", "01:00.2"]}])
    config = vm_config(node, vsock_socket=Path("/run/hearth/sweep-7/vsock.sock"),
                       serial_log=Path("/var/log/hearth/sweep-7.serial"))
    assert spec.errors("VmConfig", config) == []
    assert config["memory"] == {"size": 64 << 30, "hugepages": True, "hugepage_size": 1 << 30}
    assert config["disks"] == [{"path": str(vm_files["rootfs.img"]), "readonly": True, "id": "image"},
                               {"path": str(env), "readonly": True, "id": "env"}]  # the environment image
    assert config["platform"]["num_pci_segments"] == 3
    assert config["platform"]["oem_strings"] == ["hearth-node=sweep-7"]
    assert config["platform"]["system_uuid"] == vm_spec(**{**node.model_dump(), "gpus": [], "env_disk": None}).system_uuid
    assert [(d["id"], d["path"], d["pci_segment"], d.get("x_nv_gpudirect_clique")) for d in config["devices"]] == [
        ("gpu0", "/sys/bus/pci/devices/0000:18:00.0/", 1, 0),
        ("gpu1", "/sys/bus/pci/devices/0000:01:00.0/", 2, None),
        ("gpu1-fn1", "/sys/bus/pci/devices/0000:01:00.1/", 2, None),
        ("gpu1-fn2", "/sys/bus/pci/devices/0000:01:00.2/", 2, None),
    ]
    assert config["net"] == [{"tap": "hth-sweep7", "id": "net0", "mac": "52:54:00:ab:cd:07",
                              "ip": "10.42.0.1", "mask": "255.255.255.0"}]


def test_bad_spec_names_every_field_and_fix(vm_files, tmp_path):
    with pytest.raises(SpecError) as bad:
        vm_spec(node_id="../etc", kernel=vm_files["vmlinuz"], firmware=vm_files["vmlinuz"], image=tmp_path / "none",
                cpus=0, memory_mib=64, mac="53:54:00:00:00:01", tap="a-very-long-tap-name", vsock_cid=2,
                gpus=[{"address": "3b:00.0", "clique": 200}], colour="blue")
    text = str(bad.value)
    for expected in ("node_id: use lower-case letters", "cpus: a VM has 1 to 254 vCPUs", "memory_mib: give the VM at least",
                     "mac: the MAC's first octet must be even", "tap: a tap name is 1 to 15", "vsock_cid: guest CIDs start at 3",
                     "gpus.0.clique: an NVLink clique id is 0..127", "colour: Extra inputs are not permitted"):
        assert expected in text
    with pytest.raises(SpecError, match="give exactly one of kernel"):
        vm_spec(node_id="n", kernel=vm_files["vmlinuz"], firmware=vm_files["vmlinuz"], image=vm_files["rootfs.img"])
    with pytest.raises(SpecError, match="image: .* is not a file; build the guest image first"):
        vm_spec(node_id="n", kernel=vm_files["vmlinuz"], image=tmp_path / "missing.img")


def test_event_stream_is_parsed_across_chunk_boundaries():
    text = format_event(0.000029, "vmm", "starting") + format_event(1.5, "vm", "booting") + \
        format_event(2.25, "vm", "device-removed", {"id": "gpu0", "bdf": "0001:00:01.0"})
    assert text.count("\n\n") == 3 and '\n  "source": "vm",\n' in text
    stream, events = EventStream(), []
    for i in range(0, len(text), 7):
        events += stream.feed(text[i:i + 7])
    assert [(e.name, e.secs, e.properties) for e in events] == [
        ("vmm/starting", 0.000029, None), ("vm/booting", 1.5, None),
        ("vm/device-removed", 2.25, {"id": "gpu0", "bdf": "0001:00:01.0"})]


def test_api_errors_name_endpoint_status_and_chain():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/vm.boot":
            return httpx.Response(500, json=["Error from API", "The VM could not boot", "Error starting VM"])
        return httpx.Response(404, json=["Error from API", "VM is not created"])

    async def run():
        client = ChClient(transport=httpx.MockTransport(handler))
        with pytest.raises(VmmApiError) as boot:
            await client.boot(timeout=5)
        with pytest.raises(VmmApiError) as info:
            await client.info()
        await client.aclose()
        return boot.value, info.value

    boot, info = asyncio.run(run())
    assert str(boot) == "cloud-hypervisor vm.boot answered 500: Error from API: The VM could not boot: Error starting VM"
    assert (info.endpoint, info.status, info.chain) == ("vm.info", 404, ["Error from API", "VM is not created"])


@pytest.mark.parametrize("binary", BINARIES)
def test_boot_join_and_shutdown(run_dir, vm_files, binary):
    events = []

    async def run():
        vm = make_vm(run_dir, vm_files, binary=binary, on_event=events.append)
        await vm.start(within())
        await vm.wait_for(NodeState.ray_joined, timeout=10)
        info = await vm.client.info()
        assert info.state == "Running" and info.config["platform"]["oem_strings"] == ["hearth-node=n0"]
        assert vm.channel.last_heard is not None
        await vm.stop()
        return vm

    vm = asyncio.run(run())
    assert [e.state.value for e in events] == ["requested", "placed", "vmm_started", "booting", "guest_up",
                                               "ray_joined", "stopping", "stopped"]
    profile = vm.history.profile()
    assert set(profile) == {"placed", "vmm_started", "booting", "guest_up", "ray_joined", "total"}
    assert all(v >= 0 for v in profile.values()) and profile["total"] < 10
    names = [e.name for e in vm.vmm_events]
    assert names[:3] == ["vmm/starting", "vm/booting", "vm/booted"] and names[-1] == "vmm/shutdown"
    assert vm.process.returncode == 0  # the power button was enough: the guest shut down, CH exited
    assert left_behind(vm) == []
    assert "guest n0: config ['env', 'env_image', 'gpus', 'network', 'node', 'op', 'ray', 'reconnect_s']" in vm.serial_log.read_text()


def test_missing_binary_is_refused_before_anything_starts(run_dir, vm_files):
    vm = make_vm(run_dir, vm_files, binary="/nonexistent/cloud-hypervisor")
    with pytest.raises(SpecError, match="binary '/nonexistent/cloud-hypervisor' not found"):
        asyncio.run(vm.start(within()))
    assert not vm.dir.exists() and vm.history.events == []


def test_socket_path_too_long_is_refused(vm_files, tmp_path):
    deep = tmp_path / ("d" * 100)
    vm = make_vm(deep, vm_files)
    with pytest.raises(SpecError, match="over the 107 a Unix socket allows"):
        asyncio.run(vm.start(within()))
    assert not deep.exists()


@pytest.mark.parametrize("fault, error, words", [
    ("crash-mid-boot", VmmExited, "exited with status 101"),
    ("boot-fails", VmmApiError, "vm.boot answered 500: Error from API: The VM could not boot"),
])
def test_boot_failures_leave_nothing_behind(run_dir, vm_files, fault, error, words):
    events = []

    async def run():
        vm = make_vm(run_dir, vm_files, settings={"fault": fault, "boot_s": 0.4}, on_event=events.append)
        with pytest.raises(error) as failed:
            await vm.start(within())
        return vm, failed.value

    vm, failure = asyncio.run(run())
    assert words in str(failure)
    failed_events = [e for e in events if e.state == NodeState.failed]
    assert len(failed_events) == 1 and events[-1].state == NodeState.stopped
    assert left_behind(vm) == []
    if fault == "crash-mid-boot":
        assert "fault injected: crash in the middle of vm.boot" in str(failure)  # the VMM log's tail


def test_api_hang_times_out_and_kills_the_vmm(run_dir, vm_files):
    async def run():
        vm = make_vm(run_dir, vm_files, settings={"fault": "hang:vm.boot"})
        started = time.monotonic()
        with pytest.raises(VmmTimeout, match=r"vm.boot did not answer before the node's boot deadline \([01]\.\d s after"):
            await vm.start(within(1.0))
        return vm, time.monotonic() - started

    vm, took = asyncio.run(run())
    assert took < 12
    assert vm.process.returncode is not None and left_behind(vm) == []


def test_guest_poweroff_ends_the_vm(run_dir, vm_files):
    events = []

    async def run():
        vm = make_vm(run_dir, vm_files, settings={"guest": [*GUEST, "--poweroff-after", "0.3"]},
                     on_event=events.append)
        await vm.start(within())
        await asyncio.wait_for(vm.exited.wait(), 10)
        await vm.wait_for(NodeState.stopped, 10)
        return vm

    vm = asyncio.run(run())
    assert (events[-2].state, events[-2].detail) == (NodeState.stopping, "the guest powered off")
    assert events[-1].state == NodeState.stopped and vm.process.returncode == 0
    assert left_behind(vm) == []


def test_a_crash_after_boot_fails_the_node_and_cleans_up(run_dir, vm_files):
    events = []

    async def run():
        vm = make_vm(run_dir, vm_files, on_event=events.append)
        await vm.start(within())
        await vm.wait_for(NodeState.guest_up, 10)
        os.kill(vm.process.pid, signal.SIGKILL)
        with pytest.raises(VmmError, match="failed before ready"):
            await vm.wait_for(NodeState.ready, 10)
        await vm.wait_for(NodeState.stopped, 10)
        return vm

    vm = asyncio.run(run())
    (failed,) = [e for e in events if e.state == NodeState.failed]
    assert "cloud-hypervisor exited with status -9" in failed.detail
    assert events[-1].state == NodeState.stopped and left_behind(vm) == []


BOTH_BOOT_S = 3.0  # each VM's boot: start-up (a second or more under load) fits in the margin one boot leaves


def test_two_vms_at_once(run_dir, vm_files):
    async def run():
        vms = [make_vm(run_dir, vm_files, node=f"n{i}", settings={"boot_s": BOTH_BOOT_S}) for i in range(2)]
        started = time.monotonic()
        await asyncio.gather(*(vm.start(within()) for vm in vms))
        await asyncio.gather(*(vm.wait_for(NodeState.guest_up, 10) for vm in vms))
        both = time.monotonic() - started
        assert len({vm.process.pid for vm in vms}) == 2
        await asyncio.gather(*(vm.stop() for vm in vms))
        return vms, both

    vms, both = asyncio.run(run())
    assert both < 2 * BOTH_BOOT_S  # concurrent: two boots end to end could not be this fast, whatever the load
    assert all(left_behind(vm) == [] for vm in vms)


def test_vfio_devices_must_be_bound_and_then_boot(run_dir, vm_files, tmp_path):
    root = tmp_path / "host"
    tree = hgx_h100(root)
    gpu = {"sysfs_root": root, "gpus": [{"address": HGX_GPUS[0], "clique": 1}]}

    async def boot():
        vm = make_vm(run_dir, vm_files, spec=gpu)
        try:
            await vm.start(within())
            await vm.wait_for(NodeState.guest_up, 10)
        finally:
            await vm.stop(grace=0)
        return vm

    with pytest.raises(VmmApiError, match="bound to nvidia, not vfio-pci"):
        asyncio.run(boot())
    with FakeKernel(tree):
        apply(HostRoot(root), plan_bind(HostRoot(root), [HGX_GPUS[0]], nvml=None))
    assert left_behind(asyncio.run(boot())) == []


def test_tap_is_made_for_the_vm_and_removed_after(run_dir, vm_files):
    tap = f"hth{os.getpid() % 100000}"

    async def run():
        vm = make_vm(run_dir, vm_files, spec={"tap": tap, "mac": "52:54:00:00:00:01"}, create_tap=True)
        await vm.start(within())
        during = tap_exists(tap)
        await vm.stop()
        return during

    assert asyncio.run(run()) and not tap_exists(tap)
    failing = make_vm(run_dir, vm_files, spec={"tap": tap}, create_tap=True, settings={"fault": "boot-fails"})
    with pytest.raises(VmmApiError):
        asyncio.run(failing.start(within()))
    assert not tap_exists(tap)


def test_too_old_vmm_is_refused(run_dir, vm_files):
    vm = make_vm(run_dir, vm_files, settings={"version": "v40.0"})
    with pytest.raises(VmmError, match="v40.0 is older than v51.0"):
        asyncio.run(vm.start(within()))
    assert vm.process.returncode is not None and left_behind(vm) == []


def test_standin_follows_chs_state_rules_and_validates_bodies(run_dir, vm_files):
    socket_path = run_dir / "api.sock"
    process = subprocess.Popen([STANDIN, "--api-socket", f"path={socket_path}"],
                               env={**os.environ, "HEARTH_STANDIN": json.dumps({"boot_s": 0.01})})
    try:
        for _ in range(300):
            if socket_path.exists():
                break
            time.sleep(0.01)
        assert Path(f"{socket_path}.lock").exists()
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://localhost/api/v1/")
        config = {"payload": {"kernel": str(vm_files["vmlinuz"])}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                  "memory": {"size": 256 << 20}}
        assert client.put("vm.boot").status_code == 404
        assert client.get("vm.info").json() == ["Error from API", "The VM info is not available", "VM is not created"]
        bad = client.put("vm.create", json={**config, "cpus": {"boot_vcpus": 0}})
        assert bad.status_code == 400 and any("max_vcpus' is a required property" in m for m in bad.json())
        assert client.put("vm.create", content=b"{not json").status_code == 400
        assert client.put("vm.nosuch").status_code == 404
        assert client.get("vm.boot").status_code == 400  # the route exists, the method does not
        assert client.put("vm.create", json=config).status_code == 204
        again = client.put("vm.create", json=config)
        assert again.status_code == 500 and again.json()[-1] == "VM is already created"
        states = [client.get("vm.info").json()["state"]]
        for call in ("vm.boot", "vm.pause", "vm.resume", "vm.shutdown"):
            assert client.put(call).status_code == 204, call
            states.append(client.get("vm.info").json()["state"])
        assert states == ["Created", "Running", "Paused", "Running", "Shutdown"]
        assert spec.errors("VmInfo", client.get("vm.info").json()) == []
        assert client.put("vm.power-button").status_code == 500
        assert client.put("vmm.shutdown").status_code == 204
        assert process.wait(5) == 0
    finally:
        process.kill()


def test_contract_every_request_the_client_sent_matches_the_spec():
    """Runs last (see conftest): every request ChClient sent in this run, validated against the spec."""
    assert len(SENT) > 20
    problems = []
    for method, endpoint, body in SENT:
        spec.endpoint(method, endpoint)  # the endpoint and method exist
        schema = spec.request_schema(method, endpoint)
        if schema is None:
            assert body is None, f"{endpoint} takes no body"
        else:
            problems += [f"{endpoint}: {p}" for p in spec.errors(schema, body)]
    assert problems == []
    assert {e for _, e, _ in SENT} >= {"vmm.ping", "vm.create", "vm.boot", "vm.info", "vm.power-button"}
