"""`hearth guest build`: the image every node boots, from Debian packages and PyPI only.

    vmlinuz       Debian's cloud kernel (linux-image-cloud-amd64): boots under Cloud Hypervisor and QEMU alike
    initrd.img    busybox and the few modules the cloud kernel keeps out of its image (virtio PCI, block, net,
                  console, vsock, overlayfs); its /init loads them, mounts the image disk read-only under an
                  overlay whose writable layer is in the guest's memory, and hands over to the guest agent
    rootfs.img    ext4: Debian minbase, Python 3, a venv at /opt/hearth/venv with the controller's exact Ray
                  (Ray alone: the dashboard and job server run on the head, beside the controller),
                  and the guest agent at /opt/hearth/guest/agent.py
    manifest.json the inputs, and each file's sha256

A rebuild with the same inputs (suite, kernel and busybox package versions, Ray version, the agent's and
this recipe's own hash, the NVIDIA driver if any) reuses what is there. Needs root (debootstrap, chroot).

`--nvidia-driver 535|550 [--nvidia-modules open|proprietary]` adds NVIDIA's driver from Debian's contrib and
non-free components (guest/gpus.py says how, and how a bookworm image gets trixie's 550): the kernel modules
built by DKMS for the image's kernel, the GSP firmware, libcuda, libnvidia-ml and nvidia-smi in rootfs.img,
and NVIDIA's supported-GPU list as supported-gpus.json beside the manifest. Its versions are
`inputs["nvidia"]`; an image without the driver has exactly the inputs it had before.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guest import gpus
from provisioner.errors import BuildError

SUITE = "bookworm"
PYTHON = (3, 11)  # bookworm's python3
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"]  # bookworm has glibc 2.36
KERNEL_PACKAGE = "linux-image-cloud-amd64"
EARLY_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "vmw_vsock_virtio_transport", "overlay",
                 "erofs"]  # erofs: the controller's environment image (provisioner/envimage.py)
HERE = Path(__file__).parent
INIT = """#!/bin/busybox sh
# hearth initramfs: load the early modules, mount the image read-only under an overlay whose writable layer is
# in memory (the node's own; it goes with the VM), start the guest agent as PID 1.
/bin/busybox mkdir -p /proc /sys /dev /lower /rw /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /modules/$m.ko; done
root=/dev/vda
for i in $(/bin/busybox seq 1 100); do [ -b $root ] && break; /bin/busybox usleep 20000; done
fail() { echo "hearth initramfs: $1"; /bin/busybox poweroff -f; }
/bin/busybox mount -t ext4 -o ro,noload $root /lower || fail "cannot mount $root"
/bin/busybox mount -t tmpfs -o mode=0755 tmpfs /rw && /bin/busybox mkdir /rw/upper /rw/work || fail "no tmpfs"
/bin/busybox mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \\
    || fail "cannot mount the overlay root"
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /opt/hearth/venv/bin/python3 -S /opt/hearth/guest/agent.py
"""


def build(out: Path, *, ray_version: str, nvidia_driver: str | None = None, nvidia_modules: str | None = None,
          say=print) -> dict:
    """Build (or reuse) the image in `out`; returns the manifest."""
    nvidia = gpus.request(nvidia_driver, nvidia_modules)
    _preflight(nvidia)
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(gpus.Archive(nvidia, _mirror())) if nvidia else None
        inputs, key = _plan(ray_version, archive)
        manifest_path = out / "manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") == key and all(_sha256(out / f) == h for f, h in manifest["files"].items()):
                say(f"guest image {out} is up to date (key {key}): reused")
                return manifest
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="hearth-guest-", dir=out) as tmp:
            work = Path(tmp)
            say(f"kernel {inputs['kernel']} ...")
            modules = _kernel(inputs["kernel"], work, work / "vmlinuz")
            say("initramfs ...")
            _initramfs(inputs["busybox"], work, modules, work / "initrd.img")
            say(f"root filesystem: debootstrap {SUITE}, Python, ray=={ray_version} ...")
            _rootfs(work / "root", ray_version, _constraints())
            built = {}
            if archive is not None:
                built = gpus.install(work / "root", work, archive, inputs, work / "kernel/x", say=say)
            say("rootfs.img ...")
            _ext4(work / "root", work / "rootfs.img")
            names = ("vmlinuz", "initrd.img", "rootfs.img", *(("supported-gpus.json",) if archive else ()))
            files = {name: _sha256(work / name) for name in names}
            manifest = {"key": key, "inputs": inputs, "files": files, "built_s": round(time.monotonic() - started, 1)}
            if built:
                manifest["nvidia"] = built
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            # Only a finished build replaces the files (VMs that run the old ones keep theirs open); manifest last.
            for name in (*files, "manifest.json"):
                os.replace(work / name, out / name)
            if "supported-gpus.json" not in files:  # an image that had the driver before
                (out / "supported-gpus.json").unlink(missing_ok=True)
    say(f"guest image in {out} ({manifest['built_s']} s; rootfs.img {(out / 'rootfs.img').stat().st_size >> 20} MiB)")
    return manifest


def plan(*, ray_version: str, nvidia_driver: str | None = None, nvidia_modules: str | None = None) -> tuple[dict, str]:
    """The inputs and cache key a build with these arguments would have (the NVIDIA versions are asked of
    Debian's archive); builds nothing."""
    nvidia = gpus.request(nvidia_driver, nvidia_modules)
    with gpus.Archive(nvidia, _mirror()) if nvidia else contextlib.nullcontext() as archive:
        return _plan(ray_version, archive)


def _plan(ray_version: str, archive: gpus.Archive | None) -> tuple[dict, str]:
    inputs = {
        "suite": SUITE, "kernel": _package_version(_kernel_package()), "busybox": _package_version("busybox-static"),
        "ray": ray_version, "agent": _sha256(HERE / "agent.py"), "recipe": _sha256(Path(__file__)),
        "pins": hashlib.sha256(_constraints().encode()).hexdigest()[:16],
        "python": f"{PYTHON[0]}.{PYTHON[1]}",  # the nodes' Python: `hearth env pack` refuses a controller on another
    }
    if archive is not None:  # only then: an image without the driver keeps the inputs (and key) it had
        inputs["nvidia"] = {**archive.resolve(), "headers": gpus.headers(inputs["kernel"]), "recipe": gpus.recipe(),
                            "binding": gpus.binding()}
    return inputs, hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _preflight(nvidia: gpus.Request | None) -> None:
    if sys.version_info[:2] != PYTHON:
        raise BuildError(f"the image's Python is Debian {SUITE}'s {PYTHON[0]}.{PYTHON[1]}, and Ray needs the controller "
                         f"on the same major.minor; this controller runs {sys.version_info[0]}.{sys.version_info[1]}: "
                         f"run hearth from a Python {PYTHON[0]}.{PYTHON[1]} venv")
    if os.geteuid() != 0:
        raise BuildError("hearth guest build needs root (debootstrap and chroot); run it with sudo")
    tools = ("debootstrap", "apt-get", "dpkg-deb", "mkfs.ext4", *(("unshare", "dpkg") if nvidia else ()))
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install debootstrap e2fsprogs"
                         + (" util-linux" if nvidia else ""))


def _kernel_package() -> str:
    depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True).stdout
    found = re.search(r"Depends: (linux-image-\S+)", depends)
    if not found:
        raise BuildError(f"apt knows no {KERNEL_PACKAGE}: run apt-get update (Debian {SUITE} main)")
    return found.group(1)


def _package_version(package: str) -> str:
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    found = re.search(r"Candidate: (\S+)", policy)
    if not found or found.group(1) == "(none)":
        raise BuildError(f"apt has no {package}: run apt-get update")
    return f"{package}={found.group(1)}"


def _download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    _sh(["apt-get", "download", "-q", package], f"apt-get download {package}", cwd=into)
    (deb,) = into.glob(f"{package.split('=')[0]}_*.deb")
    extracted = into / "x"
    _sh(["dpkg-deb", "-x", str(deb), str(extracted)], f"dpkg-deb -x {deb.name}")
    return extracted


def _kernel(package: str, work: Path, vmlinuz: Path) -> list[Path]:
    """vmlinuz, and the early modules with everything they depend on, in load order."""
    tree = _download(package, work / "kernel")
    (image,) = (tree / "boot").glob("vmlinuz-*")
    shutil.copy(image, vmlinuz)
    by_name = {p.stem.replace("-", "_"): p for p in (tree / "lib/modules").rglob("*.ko")}
    ordered: list[Path] = []

    def add(name: str) -> None:
        path = by_name[name]
        if path in ordered:
            return
        info = path.read_bytes().split(b"\0")
        depends = next((x[8:].decode() for x in info if x.startswith(b"depends=")), "")
        for dependency in filter(None, depends.split(",")):
            add(dependency.replace("-", "_"))
        ordered.append(path)

    for name in EARLY_MODULES:
        add(name)
    return ordered


def _initramfs(busybox_package: str, work: Path, modules: list[Path], initrd: Path) -> None:
    busybox = _download(busybox_package, work / "busybox") / "bin/busybox"
    entries = [("bin", None, 0o40755), ("modules", None, 0o40755), ("bin/busybox", busybox.read_bytes(), 0o100755),
               ("init", INIT.encode(), 0o100755),
               ("modules.order", "\n".join(m.stem for m in modules).encode() + b"\n", 0o100644)]
    entries += [(f"modules/{m.stem}.ko", m.read_bytes(), 0o100644) for m in modules]
    with gzip.open(initrd, "wb", compresslevel=6) as out:
        out.write(_cpio(entries))


def _cpio(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as an initramfs); no cpio tool needed."""
    buffer = io.BytesIO()

    def pad(n: int) -> None:
        buffer.write(b"\0" * (-n % 4))

    for inode, (name, data, mode) in enumerate([*entries, ("TRAILER!!!", None, 0)], start=1):
        body = data or b""
        encoded = name.encode() + b"\0"
        fields = [inode, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(encoded), 0]
        buffer.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        buffer.write(encoded)
        pad(110 + len(encoded))
        buffer.write(body)
        pad(len(body))
    return buffer.getvalue()


def _rootfs(root: Path, ray_version: str, constraints: str) -> None:
    _sh(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,iproute2,kmod,ca-certificates",
         SUITE, str(root), _mirror()], "debootstrap")
    wheels = root / "tmp/wheels"
    wheels.mkdir(parents=True)
    (wheels / "constraints.txt").write_text(constraints)
    # The controller's pip (its index settings) fetches the wheels, pinned to the versions the controller
    # runs (Ray's dependencies too: what a driver pickles, a worker unpickles); the image's pip installs them
    # offline.
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    _sh([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
         "--python-version", f"{PYTHON[0]}.{PYTHON[1]}", *platforms, "-d", str(wheels),
         "-c", str(wheels / "constraints.txt"), f"ray=={ray_version}"], "pip download")
    chroot = ["chroot", str(root)]
    _sh([*chroot, "python3", "-m", "venv", "/opt/hearth/venv"], "python3 -m venv in the image")
    _sh([*chroot, "/opt/hearth/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels",
         "--disable-pip-version-check", "-c", "/tmp/wheels/constraints.txt", f"ray=={ray_version}"],
        "pip install in the image")
    shutil.rmtree(wheels)
    (root / "opt/hearth/guest").mkdir(parents=True)
    shutil.copy(HERE / "agent.py", root / "opt/hearth/guest/agent.py")
    subprocess.run([*chroot, "/opt/hearth/venv/bin/python3", "-m", "compileall", "-q", "/opt/hearth"], capture_output=True)
    (root / "etc/hostname").write_text("hearth-guest\n")
    # Names resolve locally: without these, each Ray process's lookup of "localhost" went to the build
    # machine's DNS server (debootstrap copies its resolv.conf), unreachable from a guest, and waited 20 s.
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\thearth-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (root / "etc/resolv.conf").write_text("")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists", "root/.cache"):
        shutil.rmtree(root / cache, ignore_errors=True)


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (the CI machine's may be a local one)."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if source.is_file():
            for url in re.findall(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b(?!-)", source.read_text()):
                return url
    return "http://deb.debian.org/debian"


def _ext4(root: Path, image: Path) -> None:
    used = int(subprocess.run(["du", "-sxm", str(root)], capture_output=True, text=True, check=True).stdout.split()[0])
    size = int(used * 1.1) + 64  # every VM mounts it read-only: room for the files and ext4's own, no more
    image.unlink(missing_ok=True)
    _sh(["mkfs.ext4", "-q", "-F", "-L", "hearth-root", "-O", "^has_journal", "-d", str(root), "-E", "root_owner=0:0",
         str(image), f"{size}M"], "mkfs.ext4")


def _sh(argv: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise BuildError(f"{what} failed ({done.returncode}):\n{tail}")


def _constraints() -> str:
    """The controller's installed distributions, as pins (pip uses those the image needs). Those of its
    installation (its site-packages), not whatever `sys.path` holds now: code a notebook synced, or a test's
    directory, would change the image's key in one process and not in another."""
    import sysconfig
    from importlib.metadata import distributions

    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    pins = {d.metadata["Name"].lower(): d.version for d in distributions(path=site) if d.metadata["Name"]}
    pins.pop("hearth", None)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
