"""The NVIDIA part of the guest image (`hearth guest build --nvidia-driver 535|550`), and which GPUs it supports.

Everything comes from Debian's own archive, `contrib`, `non-free` and `non-free-firmware`, at build time; nothing is
downloaded when a VM runs. Debian ships two driver branches:

    535   bookworm (+ bookworm-security)   the image's own release
    550   trixie   (+ trixie-security)     the next release; H200 (0x2335) is first listed here

The image stays Debian bookworm (its Python 3.11 is what the controllers run, and Ray wants the same minor
version on both ends), so 550 cannot simply be `apt-get install`ed into it: trixie's packages depend on trixie's
dkms, libc and alternatives. Both branches are therefore put in the same way, and neither touches the image's
package database:

  * the kernel modules are built by DKMS from the Debian source package (`nvidia-open-kernel-dkms`, or
    `nvidia-kernel-dkms` for the proprietary flavour), against the headers of exactly the kernel the image boots
    (`linux-headers-<release>` at the image's kernel package version), in a throwaway build chroot (a copy of the
    image's root with gcc, make, dkms and the headers added), then copied to the root filesystem's
    `/lib/modules/<release>/updates/dkms/` and `depmod` run for that kernel. The kernel's own modules stay out of
    the image (the initramfs carries the few it needs); `modules.builtin` comes along so `modprobe` knows what
    is built in. Compilers and headers never reach `rootfs.img`.
    Debian installs the modules as `nvidia-current*.ko` and maps `modprobe nvidia` onto them with modprobe.d
    rules from its alternatives system; the image has neither, so the DKMS configuration keeps NVIDIA's own
    names (`nvidia.ko`, `nvidia-modeset.ko`, `nvidia-uvm.ko`: what a compute node uses; no DRM, no peermem)
    and a plain `modprobe nvidia` works.
    Debian's bookworm kernel got a stable backport that added an `exclude_bars` argument to
    `pci_resize_resource()`; the 535 and 550 sources still make the three-argument call, which no longer
    compiles. When the headers declare the new argument, the call gets `, 0`, as NVIDIA's later releases do
    (behind their `pci_resize_resource_has_exclude_bars_arg` conftest). It is the resizable-BAR path, off unless
    `NVreg_EnableResizableBar=1`.
  * the user-space files are taken from the same version's binary packages with `dpkg-deb -x`: `libcuda.so.1`
    (with `libnvidia-ptxjitcompiler` and `libnvidia-pkcs11-openssl3`, which it loads), `libnvidia-ml.so.1`,
    `nvidia-smi` and the GSP firmware (`/lib/firmware/nvidia/<version>/gsp_*.bin`; the open modules need it,
    the proprietary ones use it on Turing and newer), with each package's copyright file. NVIDIA builds these
    against an old glibc (2.7-2.9 symbol versions), so trixie's run on bookworm's 2.36; the build checks that
    in the image itself (`ldd`, `nvidia-smi -h`, and Python loading each library) rather than trusting it.
    Libraries go into `/usr/lib/x86_64-linux-gnu` with their soname links and `ldconfig` is run. NVML's Python
    binding, nvidia-ml-py (NVIDIA's own, pure Python), goes into the image's venv at the controller's version: the
    guest agent reads its GPUs with it (guest/agent.py), importing it only when there are GPUs. No CUDA toolkit:
    the CUDA runtime comes with the notebook's environment (PyTorch wheels). No `nvidia-modprobe`: it is the
    setuid helper for non-root processes, and the guest's processes run as root, which create `/dev/nvidia*`
    themselves.
  * the version: the newest upstream version at which every package the flavour needs exists in the suite or
    its security suite. Debian ships the open modules from a separate source package, which is not always
    updated together with the rest (in bookworm-security the proprietary branch is at 535.309.01 while the open
    modules stay at 535.261.03), and kernel modules and user space must be the same version.
  * NVIDIA's list of supported GPUs (`supported-gpus.json`, shipped by `nvidia-driver`) goes beside the image's
    manifest; `support()` answers from it whether a PCI device id works with a flavour. Nothing here is a
    hand-written GPU list.

The driver's versions (upstream and every Debian package's), the flavour, the kernel headers, the NVML binding's
version and this file's hash are the image's `inputs["nvidia"]`, so they are part of its cache key. The archive is read through an apt
configuration of the build's own (a sources list, lists and caches in a temporary directory); the host's apt
configuration and state are not changed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from provisioner.errors import HearthError

BRANCHES = {"535": "bookworm", "550": "trixie"}  # what Debian ships; nothing else is offered
FLAVOURS = {"open": "nvidia-open-kernel-dkms", "proprietary": "nvidia-kernel-dkms"}
USER_SPACE = ("libcuda1", "libnvidia-ml1", "libnvidia-ptxjitcompiler1", "libnvidia-pkcs11-openssl3", "nvidia-smi")
PACKAGES = ("firmware-nvidia-gsp", *USER_SPACE, "nvidia-driver")  # nvidia-driver: only for supported-gpus.json
KERNEL_MODULES = ("nvidia", "nvidia-modeset", "nvidia-uvm")
COMPONENTS = "contrib non-free non-free-firmware"
LIBDIR = "usr/lib/x86_64-linux-gnu"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RESIZE_CALL = "pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size)"


class DriverError(HearthError):
    pass


@dataclass(frozen=True)
class Request:
    branch: str  # "535" or "550"
    version: str | None  # a full upstream version asked for ("550.163.01"), or None for the newest
    modules: str  # "open" or "proprietary"

    @property
    def suite(self) -> str:
        return BRANCHES[self.branch]


def request(driver: str | None, modules: str | None) -> Request | None:
    """What was asked for, checked before anything is downloaded or written; None when no driver was asked for."""
    if driver is None:
        if modules is not None:
            raise DriverError(f"--nvidia-modules {modules} needs --nvidia-driver: add --nvidia-driver 535 or 550")
        return None
    offered = " and ".join(f"{b} ({s})" for b, s in BRANCHES.items())
    branch = driver.split(".")[0]
    if branch not in BRANCHES or not re.fullmatch(r"\d+(\.\d+){0,2}", driver):
        raise DriverError(f"--nvidia-driver {driver}: Debian ships NVIDIA's driver {offered}; "
                          f"use --nvidia-driver {' or '.join(BRANCHES)}")
    modules = modules or "open"
    if modules not in FLAVOURS:
        raise DriverError(f"--nvidia-modules {modules}: the kernel modules are 'open' (Turing and newer; the default) "
                          "or 'proprietary' (for Maxwell, Pascal and Volta)")
    return Request(branch, driver if driver != branch else None, modules)


def upstream(version: str) -> str:
    """550.163.01-2 -> 550.163.01 (no epoch, no Debian revision)."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


class Archive:
    """Debian's archive for one driver branch, through an apt configuration of the build's own."""

    def __init__(self, want: Request, mirror: str, security: str | None = None):
        self.want = want
        self.mirror = mirror
        self.security = security or security_mirror()
        self._tmp = tempfile.TemporaryDirectory(prefix="hearth-nvidia-apt-")
        d = Path(self._tmp.name)
        suite = want.suite
        arch = f"[arch=amd64 signed-by={KEYRING}]"
        (d / "sources.list").write_text(f"deb {arch} {mirror} {suite} {suite}-updates {COMPONENTS}\n"
                                        f"deb {arch} {self.security} {suite}-security {COMPONENTS}\n")
        for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial", "log"):
            (d / sub).mkdir(parents=True)
        (d / "status").write_text("")
        self.options = [f"-o{k}={v}" for k, v in {
            "Dir::Etc::SourceList": d / "sources.list", "Dir::Etc::SourceParts": d / "sources.list.d",
            "Dir::Etc::Preferences": d / "preferences", "Dir::Etc::PreferencesParts": d / "preferences.d",
            "Dir::State::Lists": d / "lists", "Dir::State::status": d / "status",
            "Dir::State::extended_states": d / "extended_states", "Dir::Cache": d / "cache",
            "Dir::Cache::pkgcache": "", "Dir::Cache::srcpkgcache": "", "Dir::Log": d / "log",
            "APT::Sandbox::User": "root", "Acquire::Languages": "none"}.items()]

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def update(self) -> None:
        _run(["apt-get", *self.options, "-q", "update"], f"apt-get update (Debian {self.want.suite} {COMPONENTS} "
             f"at {self.mirror} and {self.security})")

    def resolve(self) -> dict:
        """The versions to use: the newest upstream version at which every package the flavour needs exists."""
        self.update()
        need = [FLAVOURS[self.want.modules], *PACKAGES]
        listing = _run(["apt-cache", *self.options, "madison", *need], "apt-cache madison").stdout
        versions: dict[str, list[str]] = {p: [] for p in need}
        for line in listing.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and fields[0] in versions and fields[2].endswith("Packages"):
                versions[fields[0]].append(fields[1])
        where = f"Debian {self.want.suite} ({COMPONENTS}, with {self.want.suite}-security)"
        missing = [p for p, v in versions.items() if not v]
        if missing:
            other = "open" if self.want.modules == "proprietary" else "proprietary"
            fix = (f"use --nvidia-modules {other}, or another --nvidia-driver" if FLAVOURS[self.want.modules] in missing
                   else f"check that {self.mirror} carries {COMPONENTS}")
            raise DriverError(f"--nvidia-driver {self.want.branch}: {where} has no {', '.join(missing)}: {fix}")
        common = set.intersection(*({upstream(v) for v in vs if upstream(v).split(".")[0] == self.want.branch}
                                    for vs in versions.values()))
        have = "; ".join(f"{p} {', '.join(vs)}" for p, vs in versions.items())
        if self.want.version is not None:
            if self.want.version not in common:
                offered = ", ".join(sorted(common)) or "no version with every package"
                raise DriverError(f"--nvidia-driver {self.want.version}: {where} has {offered}, not "
                                  f"{self.want.version}: use --nvidia-driver {self.want.branch}")
            chosen = self.want.version
        elif not common:
            raise DriverError(f"--nvidia-driver {self.want.branch}: {where} has no version at which every package "
                              f"the {self.want.modules} modules need is available ({have})")
        else:
            chosen = max(common, key=lambda u: tuple(int(x) for x in re.findall(r"\d+", u)))
        newest = functools.cmp_to_key(_compare)
        return {
            "driver": chosen, "modules": self.want.modules, "suite": self.want.suite,
            "packages": {p: max((v for v in vs if upstream(v) == chosen), key=newest) for p, vs in versions.items()},
        }

    def download(self, packages: dict[str, str], into: Path) -> dict[str, Path]:
        into.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "-q", "download", *(f"{p}={v}" for p, v in packages.items())],
             "apt-get download (NVIDIA's packages)", cwd=into)
        found = {}
        for package in packages:
            (deb,) = into.glob(f"{package}_*.deb")
            found[package] = deb
        return found


def security_mirror() -> str:
    """The Debian security mirror this machine's apt uses."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if source.is_file():
            for url in re.findall(r"(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(https?://\S+/debian-security)\b",
                                  source.read_text()):
                return url
    return SECURITY_MIRROR


def recipe() -> str:
    return _sha256(Path(__file__))


def binding() -> str:
    """The NVML binding the guest agent uses, pinned to the controller's (hearth depends on it for vfio/nvml.py)."""
    try:
        return f"nvidia-ml-py=={version('nvidia-ml-py')}"
    except PackageNotFoundError:
        raise DriverError("nvidia-ml-py is not installed in this controller's environment: pip install "
                          "nvidia-ml-py (hearth depends on it)") from None


def headers(kernel: str) -> str:
    """linux-image-6.1.0-57-cloud-amd64=6.1.192-3 -> linux-headers-6.1.0-57-cloud-amd64=6.1.192-3."""
    return kernel.replace("linux-image-", "linux-headers-", 1)


def install(root: Path, work: Path, archive: Archive, inputs: dict, kernel_tree: Path, say=print) -> dict:
    """Build and put the driver into the root filesystem at `root`; write `work`/supported-gpus.json.
    Returns what the build found (facts for the manifest, not inputs)."""
    nvidia = inputs["nvidia"]
    (release,) = [p.name for p in (kernel_tree / "lib/modules").iterdir()]
    say(f"NVIDIA {nvidia['driver']} ({nvidia['modules']} modules, Debian {nvidia['suite']}): downloading ...")
    debs = archive.download(nvidia["packages"], work / "nvidia-debs")
    extracted = {}
    for package, deb in debs.items():
        extracted[package] = work / "nvidia-x" / package
        extracted[package].mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(extracted[package])], f"dpkg-deb -x {deb.name}")
    say(f"NVIDIA kernel modules: DKMS against linux-headers-{release} in a build chroot ...")
    started = time.monotonic()
    built, facts = _modules(root, work / "nvidia-build", debs[FLAVOURS[nvidia["modules"]]], nvidia["headers"], release)
    facts["modules_s"] = round(time.monotonic() - started, 1)
    modules_dir = root / "lib/modules" / release
    (modules_dir / "updates/dkms").mkdir(parents=True)
    for ko in built:
        shutil.copy2(ko, modules_dir / "updates/dkms" / ko.name)
    shutil.rmtree(work / "nvidia-build")  # the compiler, the headers and dkms go with it
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        if (kernel_tree / "lib/modules" / release / name).exists():
            shutil.copy2(kernel_tree / "lib/modules" / release / name, modules_dir / name)
    _run(["chroot", str(root), "depmod", release], "depmod in the image")
    say("NVIDIA firmware, libcuda, libnvidia-ml, nvidia-smi ...")
    for package in ("firmware-nvidia-gsp", *USER_SPACE):
        _user_space(extracted[package], root, package)
    _run(["chroot", str(root), "ldconfig"], "ldconfig in the image")
    wanted = _run(["chroot", str(root), "modinfo", "-F", "firmware", f"/lib/modules/{release}/updates/dkms/nvidia.ko"],
                  "modinfo -F firmware nvidia.ko").stdout.split()  # what the module asks the kernel to load
    absent = [f for f in wanted if not (root / "usr/lib/firmware" / f).is_file()]
    if absent:
        raise DriverError(f"nvidia.ko asks for firmware the image lacks: {', '.join(absent)}")
    _binding(root, work, nvidia["binding"])
    glibc = _check_user_space(root, nvidia["driver"])
    listing = extracted["nvidia-driver"] / "usr/share/doc/nvidia-driver/supported-gpus.json.gz"
    chips = gzip.decompress(listing.read_bytes())
    if not json.loads(chips).get("chips"):
        raise DriverError(f"{listing.name} in nvidia-driver {nvidia['packages']['nvidia-driver']} lists no chips")
    (work / "supported-gpus.json").write_bytes(chips)
    for package in extracted.values():
        shutil.rmtree(package)
    return {"kernel_release": release, "kernel_modules": [f"/lib/modules/{release}/updates/dkms/{ko.name}" for ko in built],
            **facts, "glibc": glibc}


def _modules(root: Path, build: Path, dkms_deb: Path, headers_package: str, release: str) -> tuple[list[Path], dict]:
    """DKMS in a copy of the image's root, with the compiler, dkms and the kernel's headers added. Returns the
    modules and what the build found (dkms's version, its compile time, any change made to the source)."""
    build.mkdir()
    for entry in root.iterdir():  # the image's root without its venv: the same Debian, for the compiler and dkms
        if entry.name != "opt":
            _run(["cp", "-a", str(entry), str(build)], "copy the image's root for the build chroot")
    resolv = Path("/etc/resolv.conf")  # the chroot's apt reaches the image's mirror as this machine does
    (build / "etc/resolv.conf").write_bytes(resolv.read_bytes() if resolv.exists() else b"")
    debs = build / "tmp/debs"
    debs.mkdir(parents=True)
    # The headers at exactly the image's kernel version, from this machine's apt (which chose that kernel),
    # with the other packages of the kernel's source they depend on (common headers, kbuild, compiler).
    show = _run(["apt-cache", "show", headers_package], f"apt-cache show {headers_package}").stdout.split("\n\n")[0]
    kernel_version = headers_package.split("=", 1)[1]
    depends = re.search(r"^Depends: (.*)$", show, re.M)
    wanted = [headers_package] + [f"{d}={kernel_version}" for d in
                                  re.findall(r"(?:^|, )(linux-[^\s,(|]+)", depends.group(1) if depends else "")]
    _run(["apt-get", "download", "-q", *wanted], f"apt-get download {' '.join(wanted)}", cwd=debs)
    # Inside the chroot: its own apt (its own state, the image's mirror) brings dkms and the compiler.
    _chroot(build, "apt-get -q update && apt-get install -y -q --no-install-recommends dkms /tmp/debs/*.deb",
            "installing dkms, gcc and the kernel headers in the build chroot")
    _run(["dpkg-deb", "-x", str(dkms_deb), str(build)], f"dpkg-deb -x {dkms_deb.name}")
    (source,) = [p for p in (build / "usr/src").iterdir() if (p / "dkms.conf").exists()]
    name, version = source.name.rsplit("-", 1)
    conf = source / "dkms.conf"
    kept = [line for line in conf.read_text().splitlines()
            if not re.match(r"\s*(BUILT|DEST)_MODULE_(NAME|LOCATION)\[", line)]
    for i, module in enumerate(KERNEL_MODULES):  # NVIDIA's names (no Debian rename), only what compute uses
        kept += [f'BUILT_MODULE_NAME[{i}]="{module}"', f'DEST_MODULE_LOCATION[{i}]="/updates/dkms"']
    conf.write_text("\n".join(kept) + "\n")
    patched = []
    (pci_h,) = (build / "usr/src").glob("linux-headers-*-common/include/linux/pci.h")
    if re.search(r"pci_resize_resource\([^;]*exclude_bars", pci_h.read_text()):
        for c in source.rglob("nv-pci.c"):
            text = c.read_text()
            if RESIZE_CALL in text:
                c.write_text(text.replace(RESIZE_CALL, RESIZE_CALL[:-1] + ", 0)"))
                patched.append(f"{c.relative_to(source)}: pci_resize_resource(..., exclude_bars=0) for this kernel")
    jobs = os.cpu_count() or 1
    started = time.monotonic()
    done = _chroot(build, f"dkms install -j {jobs} -m {name} -v {version} -k {release}", "dkms install", check=False)
    dkms_s = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        log = next(build.glob(f"var/lib/dkms/{name}/{version}/build/make.log"), None)
        errors = [line for line in log.read_text(errors="replace").splitlines() if " error" in line.lower()] if log else []
        tail = "\n".join((errors or (done.stdout + done.stderr).splitlines())[-8:])
        raise DriverError(f"dkms install {name}/{version} for {release} failed ({done.returncode}):\n{tail}")
    dkms_version = _run(["chroot", str(build), "dpkg-query", "-W", "-f=${Version}", "dkms"], "dpkg-query").stdout
    built = [build / "lib/modules" / release / "updates/dkms" / f"{m}.ko" for m in KERNEL_MODULES]
    missing = [ko.name for ko in built if not ko.exists()]
    if missing:
        raise DriverError(f"dkms install {name}/{version} did not produce {', '.join(missing)}")
    # Every symbol the modules import is exported by this kernel, with the same CRC (modpost only warns).
    symbols = _run(["chroot", str(build), "depmod", "-n", "-e", "-E",
                    f"/usr/src/linux-headers-{release}/Module.symvers", release],
                   "depmod -e against the kernel's Module.symvers").stderr
    unresolved = [line for line in symbols.splitlines() if "unknown symbol" in line or "disagrees about version" in line]
    if unresolved:
        raise DriverError(f"the modules built for {release} do not link against it:\n" + "\n".join(unresolved[:8]))
    return built, {"dkms": f"dkms={dkms_version}", "dkms_s": dkms_s, "jobs": jobs, "patched": patched}


def _user_space(tree: Path, root: Path, package: str) -> None:
    """The files a compute node needs from one package, where the image's loader and PATH find them."""
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel.startswith(f"{LIBDIR}/nvidia/current/"):
            target = f"{LIBDIR}/{path.name}"
        elif rel == "usr/lib/nvidia/current/nvidia-smi":
            target = "usr/bin/nvidia-smi"
        elif rel.startswith("lib/firmware/nvidia/"):  # bookworm's packages predate /usr/lib/firmware
            target = f"usr/{rel}"
        elif rel.startswith((f"{LIBDIR}/", "usr/lib/firmware/nvidia/")) or rel == f"usr/share/doc/{package}/copyright":
            target = rel
        else:
            continue  # man pages, changelogs, bug scripts, Debian's alternatives
        destination = root / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.is_symlink() or destination.exists():
            destination.unlink()
        if path.is_symlink():
            destination.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, destination)


def _binding(root: Path, work: Path, pin: str) -> None:
    """nvidia-ml-py into the image's venv, from the controller's index (its pip), installed offline in the image."""
    wheels = work / "nvml-binding"
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
          "--no-deps", "-d", str(wheels), pin], f"pip download {pin}")
    (wheel,) = wheels.glob("*.whl")
    shutil.copy(wheel, root / "tmp" / wheel.name)
    _run(["chroot", str(root), "/opt/hearth/venv/bin/pip", "install", "-q", "--no-index", "--no-deps",
          "--disable-pip-version-check", f"/tmp/{wheel.name}"], f"pip install {wheel.name} in the image")
    (root / "tmp" / wheel.name).unlink()
    shutil.rmtree(wheels)


def _check_user_space(root: Path, driver: str) -> str:
    """The user-space files load and run with the image's own glibc."""
    libraries = ["libnvidia-ml.so.1", "libcuda.so.1", "libnvidia-ptxjitcompiler.so.1",
                 f"libnvidia-pkcs11-openssl3.so.{driver}"]
    ldd = _run(["chroot", str(root), "ldd", "/usr/bin/nvidia-smi", *(f"/{LIBDIR}/{lib}" for lib in libraries)],
               "ldd in the image", check=False)
    if ldd.returncode != 0 or "not found" in ldd.stdout + ldd.stderr:
        raise DriverError(f"NVIDIA's user-space files do not resolve in the image:\n{ldd.stdout}{ldd.stderr}")
    smi = (_run(["chroot", str(root), "/usr/bin/nvidia-smi", "-h"], "nvidia-smi -h in the image").stdout.splitlines()
           or [""])[0]
    if f"v{driver}" not in smi:
        raise DriverError(f"nvidia-smi in the image is not {driver}: {smi!r}")
    # Loading (not initialising: NVML's init, as root, would make /dev/nvidia* nodes in the image) checks every
    # symbol version against the image's glibc.
    _run(["chroot", str(root), "python3", "-c", "import ctypes, sys; [ctypes.CDLL(n) for n in sys.argv[1:]]", *libraries],
         "loading NVIDIA's libraries with the image's glibc")
    # The binding as the guest agent gets it (`python -S`, the venv's site-packages added) finds libnvidia-ml.
    _run(["chroot", str(root), "/opt/hearth/venv/bin/python3", "-S", "-c",
          "import sys; sys.path.append('/opt/hearth/venv/lib/python%d.%d/site-packages' % sys.version_info[:2]); "
          "import pynvml; pynvml._LoadNvmlLibrary(); assert pynvml.nvmlLib"],
         "loading libnvidia-ml through nvidia-ml-py in the image")
    for node in (root / "dev").glob("nvidia*"):
        node.unlink()
    return _run(["chroot", str(root), "ldd", "--version"], "ldd --version").stdout.splitlines()[0]


def _chroot(root: Path, script: str, what: str, check: bool = True) -> subprocess.CompletedProcess:
    """A shell script in a chroot with its own /proc (dkms needs it) in a mount namespace of its own: the mount
    goes away with the command, and nothing of the host is bound into the tree."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root", "LC_ALL": "C"}
    for proxy in ("http_proxy", "https_proxy", "no_proxy"):
        if proxy in os.environ:
            env[proxy] = os.environ[proxy]
    return _run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root),
                 "sh", "-ec", script], what, env=env, check=check)


def _run(argv: list[str], what: str, cwd: Path | None = None, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    if check and done.returncode != 0:
        tail = "\n".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-8:])
        raise DriverError(f"{what} failed ({done.returncode}):\n{tail}")
    return done


def _compare(a: str, b: str) -> int:
    if a == b:
        return 0
    return 1 if subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0 else -1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- which GPUs the image's driver supports, from NVIDIA's own list ---------------------------------------------

@dataclass(frozen=True)
class Support:
    device_id: int
    supported: bool
    names: tuple[str, ...]  # NVIDIA's names for boards with this device id ("NVIDIA H100 80GB HBM3", ...)
    why: str  # empty when supported; otherwise what is wrong and what to do


def device_id(value: int | str) -> int:
    """0x2330, "0x2330", "2330" and "10de:2330" are the same device id."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().split(":")[-1]
    try:
        return int(text, 16)
    except ValueError:
        raise DriverError(f"{value!r} is not a PCI device id (like 0x2330 or 10de:2330)") from None


def support(chips: dict | list, device: int | str, modules: str = "open", driver: str = "this driver") -> Support:
    """Does the driver whose supported-gpus.json is `chips` run PCI device `device` with `modules`?"""
    ident = device_id(device)
    entries = [c for c in (chips["chips"] if isinstance(chips, dict) else chips) if int(c["devid"], 16) == ident]
    names = tuple(dict.fromkeys(c["name"] for c in entries))
    if not entries:
        return Support(ident, False, (), f"NVIDIA's list for {driver} does not name device 0x{ident:04X}")
    current = [c for c in entries if "legacybranch" not in c]
    if not current:
        branches = ", ".join(sorted({c["legacybranch"] for c in entries}))
        return Support(ident, False, names, f"{names[0]} (0x{ident:04X}) needs NVIDIA's legacy {branches} driver, "
                                            f"which Debian does not ship for this image")
    if modules == "open" and not any("kernelopen" in c.get("features", []) for c in current):
        return Support(ident, False, names, f"{names[0]} (0x{ident:04X}) is not supported by the open kernel modules "
                                            f"of {driver}: build with --nvidia-modules proprietary")
    return Support(ident, True, names, "")


def image_support(image: Path, device: int | str, modules: str | None = None) -> Support:
    """support() for a built image: its supported-gpus.json, and its manifest's driver and flavour."""
    manifest = json.loads((image / "manifest.json").read_text())
    nvidia = manifest["inputs"].get("nvidia")
    if nvidia is None:
        return Support(device_id(device), False, (), f"the image in {image} has no NVIDIA driver: "
                                                     "build it with `hearth guest build --nvidia-driver 550`")
    chips = json.loads((image / "supported-gpus.json").read_text())
    return support(chips, device, modules or nvidia["modules"], f"{nvidia['driver']}")
