"""The environment image: the controller's Python environment, packed read-only and keyed by what is installed.

A node runs the notebook's work only if it has the kernel's packages. The controller packs its own
environment (the site-packages of `sys.prefix`: every distribution there, Ray included, and the editable and
path installs it points at) into one read-only filesystem image that each host keeps once and every VM on it
mounts (design.md, "What a node carries").

Format: erofs, lz4, 4 KiB clusters (`mkfs.erofs -zlz4`, erofs-utils; Debian bookworm has 1.5). Measured on
this 2-core machine against squashfs (squashfs-tools 4.5) on this repository's `.venv` site-packages (549 MB,
29,000 files): squashfs packs faster (zstd-3 1.7 s, 170 MB; lz4 2.2 s, 225 MB, multithreaded and deduplicating;
erofs lz4 2.9 s, 286 MB, single-threaded in 1.5), but reading it back is the cost every node pays on every
boot, and there erofs wins: reading all files after a fresh mount took 1.6-1.7 s from erofs lz4 against
2.4-3.4 s from squashfs (lz4 or zstd). erofs was made for this (compression into fixed-size output clusters,
in-place decompression, no block cache to thrash when `import torch` reads many files at random offsets),
and Debian bookworm's cloud kernel (linux-image-6.1.0-57-cloud-amd64) ships both as modules:
`kernel/fs/erofs/erofs.ko` (needs `kernel/lib/libcrc32c.ko`; lz4 only: EROFS_FS_ZIP_LZMA is off in 6.1)
and `kernel/fs/squashfs/squashfs.ko`. Files keep their modification times, so the controller's `.pyc` files
stay valid on the read-only mount (Python would otherwise recompile every module in every process).

Layout (paths relative to the mount point; the guest mounts it read-only at `MOUNT`, /opt/hearth/env):

    hearth-env.json                  what the image holds: key, format, python, interpreter, site_packages,
                                     distributions {name: version}, trees (editable and path installs)
    bin/python3, bin/python,         run these: `<mount>/bin/python3 -m ray.scripts.scripts start ...`. Ray
    bin/pythonX.Y                    starts its workers with sys.executable, so they run the env too.
      - with the interpreter (hearth-env.json "interpreter": "shipped"): the controller's own interpreter
        (bin/pythonX.Y a copy whose RUNPATH is $ORIGIN/../lib, the others links to it), its standard library
        in lib/pythonX.Y/ with lib-dynload/, and lib/libpythonX.Y.so.1.0 when it is a shared build; it finds
        its standard library from its own location, wherever the image is mounted;
      - without it ("interpreter": "guest"): a venv over the guest image's Python: bin/pythonX.Y is a link
        to /usr/bin/pythonX.Y (resolved in the guest) and pyvenv.cfg says `home = /usr/bin`.
    lib/pythonX.Y/site-packages/     the controller's site-packages: every distribution as installed,
                                     editable installs as plain packages (their sources copied in, setuptools'
                                     __editable__ hooks left out), .pth files rewritten to relative paths
    paths/<n>-<name>/                directories that .pth files put on sys.path (path installs, `setup.py
                                     develop`), reached from site-packages as ../../../paths/<n>-<name>

Console scripts (bin/ray, ...), headers and data files outside site-packages (share/, etc/) are not carried:
run `python3 -m ...`. Nor is the user site (~/.local) or a base interpreter's site-packages.

The key (envscan.py) is a sha256 over what is installed, so an unchanged environment is not packed again
(deciding so reads metadata only: 0.1-0.3 s for this repository's 549 MB .venv) and two controllers with the
same environment share one image. Images live in a per-user cache, `$XDG_CACHE_HOME/hearth/env` or
`~/.cache/hearth/env` (mode 0700), as `<key>.img` beside `<key>.json` (its sha256, size, what it holds); a
pack is staged in a temporary directory there (hard links where the filesystem allows, copies otherwise),
packed into a temporary file and renamed into place, so an image is never half-visible; two packs take turns
on a lock. The cache keeps the `KEEP_LOCAL` images last packed or found (each `pip install` makes a new one,
about half a GiB, and an old one is packed again in seconds when it comes back); `hearth env prune` keeps
only the current one. Refused before anything is written, each with its fix: a controller Python whose
major.minor is not the guest image's, a distribution built for a newer glibc than the guest's, an environment
over the size cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from provisioner.envscan import EDITABLE_HOOK, Environment, walk_tree, scan
from provisioner.errors import EnvError, HearthError
from provisioner.files import write_atomic
from provisioner.interpreter import stage as stage_interpreter

FORMAT = 1  # the layout above; bump it when the layout or the mkfs options change
MKFS = ["-zlz4", "--all-root", "--quiet"]
MOUNT = PurePosixPath("/opt/hearth/env")
DEFAULT_MAX_BYTES = 8 << 30
KEEP_LOCAL = 4  # images the local cache keeps (the last packed or found): hosts keep their own copies
GUEST_GLIBC = {"bookworm": (2, 36), "trixie": (2, 41)}


@dataclass(frozen=True)
class Guest:
    """What the nodes' guest image runs: its Debian suite, Python major.minor and glibc."""
    suite: str
    python: str
    glibc: tuple[int, int]
    source: str

    @classmethod
    def of(cls, image: Path | None = None) -> Guest:
        """From an image's manifest.json (`hearth guest build`), or what `hearth guest build` makes."""
        from guest.build import PYTHON, SUITE

        if image is None:
            return cls(SUITE, f"{PYTHON[0]}.{PYTHON[1]}", GUEST_GLIBC[SUITE], "hearth guest build")
        try:
            inputs = json.loads((image / "manifest.json").read_text())["inputs"]
        except (OSError, ValueError, KeyError) as error:
            raise EnvError(f"cannot read the guest image's manifest {image / 'manifest.json'} ({error}): "
                           f"build the image with `hearth guest build --out {image}`") from None
        suite = inputs.get("suite", SUITE)
        if suite not in GUEST_GLIBC:
            raise EnvError(f"guest image {image} is Debian {suite}, whose glibc hearth does not know: build a "
                           f"{SUITE} image with `hearth guest build`")
        return cls(suite, inputs.get("python", f"{PYTHON[0]}.{PYTHON[1]}"), GUEST_GLIBC[suite], str(image))


@dataclass(frozen=True)
class LocalImage:
    key: str
    path: Path
    sha256: str
    size: int
    meta: dict


@dataclass(frozen=True)
class Packed:
    image: LocalImage
    cached: bool
    seconds: float
    environment: Environment


def environment(prefix: Path | None = None, *, with_interpreter: bool = True,
                guest: Guest | None = None) -> Environment:
    """What `prefix` (default: this interpreter's) has installed, keyed for this packer (envscan.py)."""
    return scan(prefix, with_interpreter=with_interpreter, guest_glibc=(guest or Guest.of()).glibc,
                packer={"format": FORMAT, "mkfs": MKFS})


# -- refusals -------------------------------------------------------------------------------------------------
def check(env: Environment, guest: Guest, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Every reason the environment cannot serve the nodes, in one `EnvError`; nothing has been written."""
    problems = []
    if env.python != guest.python:
        problems.append(f"this controller runs Python {env.interpreter.version} and the guest image ({guest.source}) "
                        f"runs Python {guest.python}; Ray needs the same major.minor on the head and every node: "
                        f"run the notebook from a Python {guest.python} environment, or build a guest image for "
                        f"{env.python}")
    glibc = f"{guest.glibc[0]}.{guest.glibc[1]}"
    for dist in env.dists:
        if dist.glibc > guest.glibc:
            problems.append(f"{dist.name} {dist.version} needs glibc {dist.glibc[0]}.{dist.glibc[1]} ({dist.tag}) and "
                            f"the guest image (Debian {guest.suite}) has glibc {glibc}: install a build for "
                            f"manylinux_{guest.glibc[0]}_{guest.glibc[1]} or older (`pip download {dist.name} --no-deps "
                            f"--only-binary=:all: --python-version {env.python} --platform "
                            f"manylinux_{guest.glibc[0]}_{guest.glibc[1]}_x86_64` names the newest that fits)")
    for tree in env.trees:
        if not tree.source.exists():
            problems.append(f"{tree.source} is named by an editable or path install in {env.site_packages[0]} but "
                            "does not exist: reinstall that package, or uninstall it")
    for tree in (*env.trees, *env.loose):
        if tree.glibc > guest.glibc:
            problems.append(f"{tree.source} has compiled files that need glibc {tree.glibc[0]}.{tree.glibc[1]} and the "
                            f"guest has {glibc}: rebuild them against glibc {glibc} or older")
    if env.size > max_bytes:
        sizes = sorted([(d.size, f"{d.name} {d.version}") for d in env.dists]
                       + [(t.size, str(t.source)) for t in (*env.trees, *env.loose)], reverse=True)[:5]
        problems.append(f"the environment holds {_gib(env.size)} and the cap is {_gib(max_bytes)}; the largest: "
                        + ", ".join(f"{name} ({_gib(size)})" for size, name in sizes)
                        + ": uninstall what the nodes do not need, or raise the cap (--max-size)")
    if problems:
        raise EnvError("cannot pack the environment for the nodes:\n" + "\n".join(f"  - {p}" for p in problems))


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 28 else f"{size / (1 << 20):.1f} MiB"


# -- the local cache ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hearth" / "env"


def lookup(cache: Path, key: str) -> LocalImage | None:
    try:
        meta = json.loads((cache / f"{key}.json").read_text())
        if (cache / f"{key}.img").stat().st_size == meta["size"]:
            return LocalImage(key, cache / f"{key}.img", meta["sha256"], meta["size"], meta)
    except (OSError, ValueError, KeyError):
        pass
    return None


def images(cache: Path | None = None) -> list[LocalImage]:
    cache = cache or cache_dir()
    found = [lookup(cache, p.stem) for p in cache.glob("*.json")] if cache.is_dir() else []
    return sorted((i for i in found if i), key=lambda i: i.meta.get("packed_at", 0))


def prune(cache: Path | None = None, keep: set[str] = frozenset()) -> list[str]:
    """Remove every image (and any remains of an interrupted pack) but those whose key is in `keep`."""
    cache = cache or cache_dir()
    if not cache.is_dir():
        return []
    removed = []
    with _locked(cache):
        for path in sorted(cache.iterdir()):
            key = path.name.split(".")[0]
            if path.name.startswith(".pack-"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.suffix in (".img", ".json") and key not in keep:
                path.unlink(missing_ok=True)
                if path.suffix == ".img":
                    removed.append(key)
    return removed


def _trim(cache: Path, keep: int) -> None:
    """Remove all but the `keep` images last packed or found (the newest .json); the caller holds the lock."""
    metas = sorted(cache.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for meta in metas[keep:]:
        meta.with_suffix(".img").unlink(missing_ok=True)
        meta.unlink(missing_ok=True)


async def prune_hosts(inventory, local_dir: Path, keep: set[str] = frozenset()) -> list[dict]:
    """Ask every host's agent to remove its env images but those whose sha256 is in `keep`; an agent refuses
    the ones a VM uses or it is receiving. One row per host: removed, kept, or why it could not be asked."""
    from provisioner.agent.client import connect
    from provisioner.errors import AgentRefused

    async def one(host) -> dict:
        row = {"host": host.name, "removed": [], "kept": [], "problem": None}
        try:
            client = await connect(host, local_dir)
            try:
                for image in (await client.envs())["images"]:
                    if image["sha256"] in keep:
                        continue
                    try:
                        await client.delete_env(image["sha256"])
                        row["removed"].append(image["sha256"])
                    except AgentRefused as error:
                        if error.status != 409:
                            raise
                        row["kept"].append(image["sha256"])
            finally:
                await client.aclose()
        except HearthError as error:
            row["problem"] = str(error)
        return row

    return list(await asyncio.gather(*(one(h) for h in inventory.hosts)))


def _own_dir(cache: Path) -> Path:
    """Create the cache (each new level 0700) or check that only this user can write to it."""
    missing = [p for p in (cache, *cache.parents) if not p.exists()]
    for level in reversed(missing):
        level.mkdir(mode=0o700)
    info = cache.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise EnvError(f"{cache} belongs to uid {info.st_uid} or others can write to it: images there could be "
                       f"swapped; use a directory only you can write to (chmod 700 {cache}, or set XDG_CACHE_HOME)")
    return cache


class _locked:
    def __init__(self, cache: Path) -> None:
        self.path = cache / ".lock"

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


# -- packing --------------------------------------------------------------------------------------------------
def pack(prefix: Path | None = None, *, image: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
         cache: Path | None = None, with_interpreter: bool = True, say=lambda text: None) -> Packed:
    """The image of `prefix`'s environment (default: this interpreter's), packed now or found in the cache.
    `image`: the guest image directory whose manifest names the Python and suite the nodes run.
    `with_interpreter`: carry this interpreter when it is relocatable (False: nodes run the guest's)."""
    started = time.perf_counter()
    guest = Guest.of(image)
    env = environment(prefix, with_interpreter=with_interpreter, guest=guest)
    check(env, guest, max_bytes)
    cache = cache or cache_dir()
    hit = lookup(cache, env.key)
    if hit:
        with contextlib.suppress(OSError):  # found: it counts as recent for the trim after the next pack
            os.utime(cache / f"{env.key}.json")
        return Packed(hit, True, time.perf_counter() - started, env)
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise EnvError("mkfs.erofs is not installed: apt-get install erofs-utils")
    _own_dir(cache)
    with _locked(cache):
        hit = lookup(cache, env.key)  # another pack of the same environment finished while we waited
        if hit:
            return Packed(hit, True, time.perf_counter() - started, env)
        say(f"packing the environment ({_gib(env.size)}) ...")
        with tempfile.TemporaryDirectory(prefix=".pack-", dir=cache) as temp:
            root, out = Path(temp) / "root", Path(temp) / "env.img"
            meta = stage(env, root)
            done = subprocess.run([mkfs, *MKFS, f"-U{uuid.UUID(env.key[:32])}", str(out), str(root)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise EnvError(f"mkfs.erofs failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
            os.chmod(out, 0o444)
            meta.update(sha256=_sha256(out), size=out.stat().st_size, packed_at=time.time(),
                        pack_s=round(time.perf_counter() - started, 2))
            os.replace(out, cache / f"{env.key}.img")
            try:
                write_atomic(cache / f"{env.key}.json", json.dumps(meta, indent=1), 0o600)
            except BaseException:
                (cache / f"{env.key}.img").unlink()
                raise
            _trim(cache, KEEP_LOCAL)
    return Packed(lookup(cache, env.key), False, time.perf_counter() - started, env)


def stage(env: Environment, root: Path) -> dict:
    """Lay the image out under `root` (module docstring); returns what hearth-env.json says."""
    site = root / env.site_target
    site.mkdir(parents=True)
    if env.interpreter.shipped:
        stage_interpreter(env.interpreter, root, _place)
    else:
        (root / "bin").mkdir()
        (root / f"bin/python{env.python}").symlink_to(f"/usr/bin/python{env.python}")
        for alias in ("python3", "python"):
            (root / "bin" / alias).symlink_to(f"python{env.python}")
        (root / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {env.python}\n")
    for directory in env.site_packages:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if not EDITABLE_HOOK.match(entry.name) and entry.name not in env.pth:
                _place(Path(entry.path), site / entry.name)
    for name, text in env.pth.items():
        (site / name).write_text(text)
    for tree in env.trees:
        target = root / tree.target
        target.parent.mkdir(parents=True, exist_ok=True)
        if tree.source.is_file():
            _place(tree.source, target)
        else:
            for path, relative in walk_tree(tree.source, pyc=True):  # .pyc files speed imports; the key ignores them
                _place(path, target / relative, parents=True)
    meta = {"format": FORMAT, "key": env.key, "python": env.interpreter.version if env.interpreter.shipped else env.python,
            "interpreter": "shipped" if env.interpreter.shipped else "guest",
            "interpreter_reason": env.interpreter.reason, "unavailable_modules": env.interpreter.unavailable,
            "site_packages": env.site_target, "distributions": {d.name: d.version for d in env.dists},
            "trees": {t.target: str(t.source) for t in env.trees}}
    (root / "hearth-env.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _place(source: Path, target: Path, parents: bool = False) -> None:
    """Put `source` (a file, a directory or a link) at `target`: hard links where the filesystem allows
    (nothing is copied), copies otherwise. A link that stays inside the directory it sits in stays a link;
    any other is replaced by what it points to (the guest has none of the controller's paths)."""
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    _put(str(source), str(target), os.path.islink(source), os.path.isdir(source))


def _put(source: str, target: str, link: bool, directory: bool) -> None:
    if link:
        pointed, resolved, here = os.readlink(source), os.path.realpath(source), os.path.realpath(os.path.dirname(source))
        if not os.path.isabs(pointed) and resolved.startswith(here + os.sep):
            os.symlink(pointed, target)
            return
        if not os.path.exists(resolved) or (here + os.sep).startswith(resolved + os.sep):
            return  # dangling, or a loop
        source, directory = resolved, os.path.isdir(resolved)
    if directory:
        os.makedirs(target, exist_ok=True)
        with os.scandir(source) as entries:  # the entries' types come from the directory: no stat per file
            for entry in entries:
                _put(entry.path, os.path.join(target, entry.name), entry.is_symlink(), entry.is_dir(follow_symlinks=False))
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or protected_hardlinks: copy, keeping the mtime .pyc files check
        shutil.copy2(source, target)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
