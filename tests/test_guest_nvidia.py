"""`hearth guest build --nvidia-driver`: NVIDIA's driver from Debian in the guest image, built for real (no GPU
here: what only a GPU host can show is listed in the README). The image is built in CI (CI=true) from scratch on
every run; elsewhere into /var/cache/hearth/test-guest-image-nvidia<branch>, reused while its inputs are unchanged.
HEARTH_TEST_NVIDIA_DRIVERS names the images to build: a branch, optionally with a module flavour ("550,535" by
default: from scratch each took 4-8 minutes on a 2-core machine; "550:proprietary" builds that flavour)."""

from __future__ import annotations

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

from guest.build import plan
from guest.gpus import image_support

pytestmark = [pytest.mark.slow, pytest.mark.root("images are built as root")]
HEARTH = str(Path(sys.executable).with_name("hearth"))
BRANCHES = os.environ.get("HEARTH_TEST_NVIDIA_DRIVERS", "550,535").split(",")
MODULES = ("nvidia", "nvidia-modeset", "nvidia-uvm")


def _say(request, text: str) -> None:
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(text, flush=True)


@pytest.fixture(scope="module", params=BRANCHES)
def image(request, tmp_path_factory):
    branch, _, flavour = request.param.partition(":")
    name = f"nvidia{branch}{'-' + flavour if flavour else ''}"
    fresh = os.environ.get("CI") == "true"
    out = tmp_path_factory.mktemp(f"guest-image-{name}") if fresh else Path(f"/var/cache/hearth/test-guest-image-{name}")
    command = [HEARTH, "guest", "build", "--out", str(out), "--nvidia-driver", branch,
               *(["--nvidia-modules", flavour] if flavour else [])]
    started = time.monotonic()
    built = subprocess.run(command, capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout + built.stderr
    took = time.monotonic() - started
    manifest = json.loads((out / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, f"{name} does not match the manifest"
    started = time.monotonic()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reused" in again.stdout, again.stdout + again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest
    nvidia = manifest["nvidia"]
    _say(request, f"\nguest image {out} with NVIDIA {manifest['inputs']['nvidia']['driver']} "
                  f"({manifest['inputs']['nvidia']['modules']}): {'reused' if 'reused' in built.stdout else 'built'} "
                  f"in {took:.1f} s (from scratch it took {manifest['built_s']} s, the modules {nvidia['modules_s']} s "
                  f"of which DKMS compiling {nvidia['dkms_s']} s with -j{nvidia['jobs']}); "
                  f"a rebuild with the same inputs: {time.monotonic() - started:.1f} s; "
                  f"rootfs {(out / 'rootfs.img').stat().st_size >> 20} MiB")
    yield branch, flavour or "open", out, manifest
    if fresh:
        subprocess.run(["rm", "-rf", str(out)])


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
