"""`hearth guest build --nvidia-driver`: NVIDIA's driver from Debian in the guest image, built for real, and booted
under QEMU without a GPU (no GPU here: what only a GPU host can show is listed in the README). The image is built in
CI (CI=true) from scratch on every run; elsewhere into /var/cache/hearth/test-guest-image-nvidia<branch>
(HEARTH_TEST_NVIDIA_IMAGE<branch>), reused while its inputs are unchanged; one session builds each once (the
`nvidia_images` fixture). HEARTH_TEST_NVIDIA_DRIVERS names the images to build: a branch, optionally with a module
flavour ("550" by default, to keep CI's run short: from scratch each took 4-8 minutes on a 2-core machine;
"550,535" builds both, "550:proprietary" that
flavour); the QEMU boots use the first."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import NVIDIA_DRIVERS, QEMU_GATEWAY, QEMU_SUBNET, say
from guest.build import plan
from guest.gpus import image_support

pytestmark = [pytest.mark.slow, pytest.mark.root("images are built as root")]
HEARTH = str(Path(sys.executable).with_name("hearth"))
BRANCHES = NVIDIA_DRIVERS
MODULES = ("nvidia", "nvidia-modeset", "nvidia-uvm")


@pytest.fixture(scope="module", params=BRANCHES)
def image(request, nvidia_images):
    return nvidia_images(request.param)


def _debugfs(rootfs: Path, command: str) -> str:
    done = subprocess.run(["debugfs", "-R", command, str(rootfs)], capture_output=True, text=True)
    return done.stdout + done.stderr


def _dump(rootfs: Path, path: str, to: Path) -> Path:
    to.unlink(missing_ok=True)
    _debugfs(rootfs, f"dump {path} {to}")
    assert to.exists() and to.stat().st_size > 0, f"{path} is not in the image"
    return to


def _modinfo(path: Path, field: str) -> list[str]:
    done = subprocess.run(["modinfo", "-F", field, str(path)], capture_output=True, text=True, check=True)
    return done.stdout.split("\n")[:-1]


def _kernel_release(vmlinuz: Path) -> str:
    """The release the kernel itself reports (uname -r), read from its bzImage header."""
    data = vmlinuz.read_bytes()
    offset = 0x200 + int.from_bytes(data[0x20E:0x210], "little")
    return data[offset:offset + 256].split(b" ")[0].decode()


def test_the_modules_are_built_for_the_images_kernel(image, tmp_path):
    branch, flavour, out, manifest = image
    rootfs = out / "rootfs.img"
    release = _kernel_release(out / "vmlinuz")
    assert manifest["inputs"]["kernel"].startswith(f"linux-image-{release}=")
    assert manifest["nvidia"]["kernel_release"] == release
    driver = manifest["inputs"]["nvidia"]["driver"]
    assert 'Fast link dest: "usr/lib"' in _debugfs(rootfs, "stat /lib")  # /lib/modules, /lib/firmware are in /usr/lib
    base = f"/usr/lib/modules/{release}"
    for module in MODULES:
        ko = _dump(rootfs, f"{base}/updates/dkms/{module}.ko", tmp_path / f"{module}.ko")
        assert _modinfo(ko, "vermagic")[0].split()[0] == release
        assert _modinfo(ko, "name") == [module.replace("-", "_")]
        assert _modinfo(ko, "version") == [driver]
    # the open nvidia.ko is MIT/GPL, the proprietary one NVIDIA's
    open_modules = manifest["inputs"]["nvidia"]["modules"] == "open"
    assert _modinfo(tmp_path / "nvidia.ko", "license") == ["Dual MIT/GPL" if open_modules else "NVIDIA"]
    depends = _dump(rootfs, f"{base}/modules.dep", tmp_path / "modules.dep").read_text().splitlines()
    assert "updates/dkms/nvidia.ko:" in depends
    assert "updates/dkms/nvidia-uvm.ko: updates/dkms/nvidia.ko" in depends
    assert "updates/dkms/nvidia-modeset.ko: updates/dkms/nvidia.ko" in depends
    # modprobe, given the image's module directory, resolves nvidia-uvm to the two files (shown, never loaded)
    tree = tmp_path / "tree"
    (tree / "lib/modules").mkdir(parents=True)
    _debugfs(rootfs, f"rdump {base} {tree / 'lib/modules'}")
    shown = subprocess.run(["modprobe", "--dirname", str(tree), "--set-version", release, "--show-depends", "nvidia-uvm"],
                           capture_output=True, text=True)
    assert shown.stdout.split("\n") == [f"insmod {tree}/lib/modules/{release}/updates/dkms/{m}.ko " for m in
                                        ("nvidia", "nvidia-uvm")] + [""], shown.stdout + shown.stderr
    # every firmware file the module asks the kernel for is in the image, where the kernel looks (/lib/firmware)
    wanted = _modinfo(tmp_path / "nvidia.ko", "firmware")
    assert wanted and all(f.startswith(f"nvidia/{driver}/gsp_") for f in wanted)
    for firmware in wanted:
        assert "Type: regular" in _debugfs(rootfs, f"stat /usr/lib/firmware/{firmware}"), firmware


def test_the_user_space_resolves_and_nothing_of_the_build_is_left(image, tmp_path):
    branch, flavour, out, manifest = image
    rootfs = out / "rootfs.img"
    driver = manifest["inputs"]["nvidia"]["driver"]
    smi = _debugfs(rootfs, "stat /usr/bin/nvidia-smi")
    assert "Type: regular" in smi and re.search(r"Mode:\s+0755", smi), smi
    cache = _dump(rootfs, "/etc/ld.so.cache", tmp_path / "ld.so.cache")
    listing = subprocess.run(["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True).stdout
    for library in ("libnvidia-ml.so.1", "libcuda.so.1", "libnvidia-ptxjitcompiler.so.1"):
        found = re.search(rf"^\s+{re.escape(library)} \(libc6,x86-64\) => (\S+)$", listing, re.M)
        assert found, f"{library} is not in the image's ld.so.cache"
        link = _debugfs(rootfs, f"stat {found.group(1)}")
        assert "Type: symlink" in link and f'Fast link dest: "{library.rsplit(".", 1)[0]}.{driver}"' in link, link
        target = str(Path(found.group(1)).with_name(f"{library.rsplit('.', 1)[0]}.{driver}"))
        assert "Type: regular" in _debugfs(rootfs, f"stat {target}")
    assert "Type: regular" in _debugfs(rootfs, "stat /usr/share/doc/libcuda1/copyright")
    # NVML's Python binding, for the guest agent, in the image's venv at the controller's version
    binding = manifest["inputs"]["nvidia"]["binding"]
    assert binding == f"nvidia-ml-py=={version('nvidia-ml-py')}"
    listing = _debugfs(rootfs, "ls /opt/hearth/venv/lib/python3.11/site-packages")
    assert "pynvml.py" in listing and f"nvidia_ml_py-{binding.split('==')[1]}.dist-info" in listing
    # the compiler, the headers and DKMS stayed in the build chroot
    for gone in ("/usr/bin/gcc-12", "/usr/bin/make", "/usr/sbin/dkms", "/var/lib/dkms",
                 f"/usr/src/linux-headers-{manifest['nvidia']['kernel_release']}", "/usr/lib/firmware/nvidia/nonexistent"):
        assert "File not found" in _debugfs(rootfs, f"stat {gone}"), gone
    assert "nvidia" not in _debugfs(rootfs, "ls /dev")


def test_manifest_names_the_driver_and_its_key_is_not_the_plain_images(image):
    branch, flavour, out, manifest = image
    nvidia = manifest["inputs"]["nvidia"]
    assert nvidia["driver"].startswith(f"{branch}.") and nvidia["modules"] == flavour
    assert nvidia["suite"] == {"535": "bookworm", "550": "trixie"}[branch]
    source = {"open": "nvidia-open-kernel-dkms", "proprietary": "nvidia-kernel-dkms"}[flavour]
    assert set(nvidia["packages"]) >= {source, "firmware-nvidia-gsp", "libcuda1", "libnvidia-ml1", "nvidia-smi"}
    assert all(v.startswith(f"{nvidia['driver']}-") for v in nvidia["packages"].values())
    assert nvidia["headers"] == manifest["inputs"]["kernel"].replace("linux-image-", "linux-headers-")
    assert manifest["files"].keys() == {"vmlinuz", "initrd.img", "rootfs.img", "supported-gpus.json"}
    plain_inputs, plain_key = plan(ray_version=version("ray"))
    assert "nvidia" not in plain_inputs and plain_key != manifest["key"]
    assert {k: v for k, v in manifest["inputs"].items() if k != "nvidia"} == plain_inputs


def test_supported_gpus_come_from_nvidias_list(image):
    branch, flavour, out, manifest = image
    chips = json.loads((out / "supported-gpus.json").read_text())["chips"]
    assert len(chips) > 1000  # NVIDIA's whole list, not a hand-made one
    h100 = image_support(out, "10de:2330")
    assert h100.supported and any("H100" in n for n in h100.names), h100
    assert image_support(out, 0x26B9).supported  # L40S
    h200 = image_support(out, "0x2335")
    assert h200.supported == (branch != "535"), h200
    v100 = image_support(out, 0x1DB1, modules="open")  # Volta: only the proprietary modules
    assert not v100.supported and "--nvidia-modules proprietary" in v100.why
    assert image_support(out, 0x1DB1, modules="proprietary").supported
    assert "legacy" in image_support(out, 0x0020).why  # RIVA TNT
    assert "does not name device 0xFFFF" in image_support(out, 0xFFFF).why


@pytest.mark.parametrize("args, message", [
    (["--nvidia-driver", "560"], "Debian ships NVIDIA's driver 535 (bookworm) and 550 (trixie); use --nvidia-driver 535 or 550"),
    (["--nvidia-driver", "550", "--nvidia-modules", "closed"], "the kernel modules are 'open'"),
    (["--nvidia-modules", "proprietary"], "--nvidia-modules proprietary needs --nvidia-driver"),
    (["--nvidia-driver", "550.54"], "Debian trixie (contrib non-free non-free-firmware, with trixie-security) has 550."),
])
def test_bad_driver_requests_are_refused_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "nv"
    refused = subprocess.run([HEARTH, "guest", "build", "--out", str(out), *args], capture_output=True, text=True)
    assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    assert not out.exists()


# -- the driver image booted under QEMU, without a GPU (TCG here: /dev/kvm runs only PVM guests) -----------------
def _inventory(bridge: str):
    from provisioner.hosts import Host, HostNetwork, Inventory

    return Inventory(hosts=[Host(name="local", network=HostNetwork(bridge=bridge, subnet=QEMU_SUBNET))],
                     head_host=QEMU_GATEWAY)


@pytest.mark.requires("qemu-system-x86_64")
def test_without_a_gpu_the_driver_image_says_so_and_joins_ray_with_none(request, nvidia_images, qemu_bridge, tmp_path):
    """A node booted from the driver image with no GPU passed through: the guest agent looks, says "no NVIDIA
    GPU" (and loads no driver), and the node joins Ray with 0 GPUs."""
    from provisioner.run import ClusterRun
    from provisioner.spec import cluster_spec

    _, _, out, _ = nvidia_images(BRANCHES[0])
    name = f"nv{os.getpid() % 10000}"
    spec = cluster_spec(nodes=1, backend="qemu", image=out, name=name, boot_timeout=500, memory_gib=2, cpus=1)
    run = ClusterRun(spec, Path("/tmp/hq") / name, inventory=_inventory(qemu_bridge))

    async def scenario():
        started = time.monotonic()
        await run.up()
        up_s = time.monotonic() - started
        try:
            (record,) = run.engine.nodes.values()
            nodes = await run.head.nodes()
            return up_s, run.summary()["nodes"][0], [n for n in nodes if n.get("state") == "ALIVE"
                                                    and n["labels"].get("hearth.io/node") == record.node_id]
        finally:
            await run.down()

    up_s, node, (ray_node,) = asyncio.run(scenario())
    assert node["state"] == "ready"
    guest_up = next(e["detail"] for e in node["events"] if e["state"] == "guest_up")
    looked = re.search(r"no NVIDIA GPU \((\d+\.\d+) s to look\)", guest_up)
    assert looked, guest_up
    assert "gpu driver" not in node["guest_profile"]  # nothing was loaded
    assert "GPU" not in ray_node["resources_total"] and ray_node["resources_total"]["CPU"] == 1
    say(request, f"\nNVIDIA image, no GPU, under TCG: `hearth up`-style boot to a ready node in {up_s:.1f} s; the guest "
                 f"agent looked for GPUs in {looked.group(1)} s; boot profile {node['profile']}; inside the guest "
                 f"{node['guest_profile']}")


@pytest.mark.requires("qemu-system-x86_64")
def test_told_to_carry_a_gpu_it_was_not_given_the_node_fails_with_the_drivers_words(request, nvidia_images,
                                                                                  qemu_bridge, run_dir):
    """The same image and node, its guest config naming the GPU its VM should have (as a host agent names the
    GPUs it leased): QEMU passes none, so the guest loads the driver to ask, and the node fails with modprobe's
    and the kernel's own words."""
    from provisioner.backends.qemu import kvm_usable
    from provisioner.errors import NodeEnded
    from provisioner.events import NodeHistory, NodeState, NodeTracker
    from provisioner.net import guest_mac, tap_name
    from provisioner.node import ExpectedGpu, GuestConfig, GuestNetwork, NodeSpec, RayJoin
    from provisioner.qemu.vm import QemuVm
    import ipaddress

    _, _, out, _ = nvidia_images(BRANCHES[0])
    address = ipaddress.ip_address(QEMU_SUBNET.rsplit(".", 1)[0] + ".250")  # clear of the backend's addresses
    node = NodeSpec(id="nv-gpu", uid="u1", host="local", image=out, memory_mib=2048,
                    ray=RayJoin(address=f"{QEMU_GATEWAY}:9", token="not-a-secret", num_gpus=1))
    guest = GuestConfig.for_node(node, reconnect_s=10, gpus=[ExpectedGpu(address="0000:18:00.0", device="10de:2330")],
                                 network=GuestNetwork(address=f"{address}/24", gateway=QEMU_GATEWAY, mac=guest_mac(address)))
    history = NodeHistory(node.id)
    tracker = NodeTracker(history)
    tracker.transition(NodeState.requested)  # the engine's part
    tracker.transition(NodeState.placed, "local")
    vm = QemuVm(node, run_dir, guest, tracker, accel="kvm" if kvm_usable() else "tcg",
                network={"tap": tap_name(address), "mac": guest_mac(address), "bridge": qemu_bridge})

    async def scenario():
        started = time.monotonic()
        await vm.start(time.monotonic() + 400)
        try:
            with pytest.raises(NodeEnded) as ended:
                await vm.wait_for(NodeState.ray_joined, 400)
            return ended.value.reason, time.monotonic() - started
        finally:
            await vm.stop(grace=5)

    reason, took = asyncio.run(scenario())
    assert reason.startswith("the guest agent: GPUs: the node was given 1 (1 x 10de:2330), the guest found 0 (none); "
                             "the driver says: modprobe: ERROR: could not insert 'nvidia': No such device"), reason
    assert "NVRM" in reason, reason  # the kernel's own lines
    serial = vm.serial_log.read_text(errors="replace")
    loaded = re.search(r"modprobe nvidia failed after (\d+\.\d+) s", serial)
    assert loaded, serial[-3000:]
    assert [e.state for e in history.events][-3:] == [NodeState.failed, NodeState.stopping, NodeState.stopped]
    say(request, f"\nNVIDIA image told to carry a GPU under TCG: failed {took:.1f} s after QEMU started; modprobe nvidia "
                 f"(no GPU: the module loads, finds none and unloads) took {loaded.group(1)} s; the reason: {reason}")
