"""The notebook's own code and data on every node, the way FLAME re-syncs changed code before each call.

What travels, the "code tree": the notebook's directory (the kernel's working directory: its modules,
packages and data files, as git sees them: `.gitignore` honoured; hidden directories, `__pycache__`,
virtual environments and checkpoints never), plus the modules the kernel imported from outside both that
directory and the Python installation (a `src/` elsewhere on `sys.path`), under `_modules/`. Over `CAP` in
all, it is refused before anything starts, naming the largest files and the fixes.

How: a snapshot per change, never a new runtime_env per call (each would start new worker processes). The
controller hashes the tree, re-reading a file only when its size or mtime changed, and when the hash is new
it stores the tree, a tar, in the cluster's own key-value store (Ray's internal KV, in the head's GCS, behind
the cluster's token). On a node, the first worker that needs a version fetches it once per node into
`<tmp>/hearth-code-<uid>/<hash>/` (a lock: one extraction per node). A worker that activates a version
changes into it (data files open by their path relative to the notebook), puts it (and the kernel's
`sys.path` entries inside it) first on `sys.path`, and forgets the modules it imported from an earlier
version, so the next import reads the new code.

When: at each worker's start (a job-level `worker_process_setup_hook`, set once when the kernel connects),
and before every `Pool` call, which carries the version it needs: a module edited in the notebook's
directory is seen by the next `Pool.call`/`map`. A plain Ray task runs the version that was current when its
worker started (or that the last Pool call on that worker activated).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.errors import SpecError

CAP = 64 << 20
MAX_FILES = 20_000  # beyond this it is not a notebook's directory but a home or a dataset: refuse early
NAMESPACE = "hearth"
CURRENT = "code:current"
NEVER = {"__pycache__", ".git", ".hg", ".svn", ".ipynb_checkpoints", "node_modules", ".venv", "venv", ".tox",
         ".mypy_cache", ".pytest_cache", ".ruff_cache", "test-artifacts"}


@dataclass
class Snapshot:
    hash: str
    files: dict[str, Path]  # path in the tree -> where it is here
    size: int
    paths: list[str]  # sys.path entries inside the tree, relative to it ("." for the tree itself)
    root: Path  # where the tree is on the controller


@dataclass
class CodeTree:
    """The controller's view of what travels; `snapshot()` is cheap when nothing changed."""

    root: Path = field(default_factory=Path.cwd)
    cap: int = CAP
    _digests: dict[Path, tuple[int, int, str]] = field(default_factory=dict)  # path -> (size, mtime_ns, sha256)
    _published: set[tuple[str, str]] = field(default_factory=set)  # (cluster's GCS, version) stored there

    def files(self) -> tuple[dict[str, Path], list[str]]:
        files: dict[str, Path] = {}
        ignores = _Ignores()
        for directory, dirs, names in os.walk(self.root):
            here = Path(directory)
            relative = here.relative_to(self.root)
            if ".gitignore" in names:
                ignores.add(relative, here / ".gitignore")
            dirs[:] = sorted(d for d in dirs if d not in NEVER and not d.startswith(".")
                             and not (here / d / "pyvenv.cfg").exists() and not ignores(relative / d, True))
            for name in sorted(names):
                path = here / name
                if not name.startswith(".") and path.is_file() and not ignores(relative / name, False):
                    files[str(relative / name)] = path
            if len(files) > MAX_FILES:
                raise SpecError(f"the notebook's directory {self.root} holds over {MAX_FILES} files to send to every "
                                "node: list what the nodes do not need in .gitignore, run the notebook from a smaller "
                                "directory, or pass sync_code=False")
        paths = ["."]
        installed = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)]
        for entry in sys.path:
            resolved = Path(entry or ".").resolve()
            if resolved == self.root or not resolved.is_relative_to(self.root):
                continue
            relative = resolved.relative_to(self.root)
            # Not the kernel's own installation (a .venv inside the notebook's directory): it is not in the tree,
            # and on the nodes the environment (image) provides it; shadowing it would hide Ray from the workers.
            if any(part in NEVER or part.startswith(".") for part in relative.parts) or any(
                    resolved.is_relative_to(p) for p in installed) or "site-packages" in relative.parts:
                continue
            paths.append(str(relative))
        for name, origin in _outside_modules(self.root):
            relative = f"_modules/{origin.name}"
            if origin.is_dir():
                for path in sorted(origin.rglob("*.py")):
                    files[f"{relative}/{path.relative_to(origin)}"] = path
            else:
                files[relative] = origin
            if "_modules" not in paths:
                paths.append("_modules")
        return files, paths

    def snapshot(self) -> Snapshot:
        files, paths = self.files()
        size = 0
        digest = hashlib.sha256()
        sizes = []
        for name, path in files.items():
            info = path.stat()
            cached = self._digests.get(path)
            if cached is None or cached[:2] != (info.st_size, info.st_mtime_ns):
                cached = (info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
                self._digests[path] = cached
            size += info.st_size
            sizes.append((info.st_size, name))
            digest.update(f"{name}\0{cached[2]}\0".encode())
        digest.update("\0".join(paths).encode())
        if size > self.cap:
            largest = ", ".join(f"{name} ({n / (1 << 20):.1f} MiB)" for n, name in sorted(sizes, reverse=True)[:5])
            raise SpecError(f"the notebook's directory {self.root} holds {size / (1 << 20):.1f} MiB to send to every "
                            f"node, over the {self.cap >> 20} MiB cap; the largest: {largest}. List what the nodes do not "
                            "need in .gitignore, run the notebook from a smaller directory, or pass sync_code=False "
                            "(and ship data with ray.put or shared storage)")
        return Snapshot(digest.hexdigest()[:32], files, size, paths, self.root)

    def publish(self, gcs_address: str) -> str:
        """The current version, stored in the cluster's KV if it is new there; returns its hash. Through a GCS
        client of its own, so it can run before this process's Ray connects (its workers' setup reads it)."""
        from ray._raylet import GcsClient

        snapshot = self.snapshot()
        gcs = GcsClient(address=gcs_address)
        if (gcs_address, snapshot.hash) not in self._published:
            gcs.internal_kv_put(f"code:{snapshot.hash}".encode(), _tar(snapshot), True, NAMESPACE.encode())
            self._published.add((gcs_address, snapshot.hash))
        gcs.internal_kv_put(CURRENT.encode(), snapshot.hash.encode(), True, NAMESPACE.encode())
        return snapshot.hash


def _tar(snapshot: Snapshot) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, path in snapshot.files.items():
            tar.add(path, arcname=name, recursive=False)
        manifest = json.dumps({"root": str(snapshot.root), "paths": snapshot.paths}).encode()
        info = tarfile.TarInfo(".hearth-tree")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return buffer.getvalue()


class _Ignores:
    """The tree's .gitignore files, as git applies them: each to the paths under its own directory."""

    def __init__(self) -> None:
        self.specs = []

    def add(self, base: Path, gitignore: Path) -> None:
        import pathspec

        lines = gitignore.read_text(errors="replace").splitlines()
        self.specs.append((base, pathspec.GitIgnoreSpec.from_lines(lines)))

    def __call__(self, path: Path, is_dir: bool) -> bool:
        for base, spec in self.specs:
            if base == Path(".") or path.is_relative_to(base):
                if spec.match_file(str(path.relative_to(base)) + ("/" if is_dir else "")):
                    return True
        return False


def _outside_modules(root: Path) -> list[tuple[str, Path]]:
    """Top-level modules the kernel imported from neither the notebook's directory nor the installation (an
    installed distribution, editable ones included, travels in the environment image instead)."""
    from importlib.metadata import packages_distributions

    installed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    distributed = set(packages_distributions())
    found = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name == "__main__" or name in distributed:
            continue
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        path = Path(origin).resolve()
        if path.is_relative_to(root) or any(path.is_relative_to(p) for p in installed) or "site-packages" in path.parts:
            continue
        found[name] = path.parent if path.name == "__init__.py" else path
    return sorted(found.items())


# -- on a node ----------------------------------------------------------------------------------------
_active: dict[str, Any] = {"hash": None, "dir": None, "paths": [], "shadowed": []}


def activate(version: str) -> None:
    """Run this worker's next task in `version` of the code tree (fetched to this node if it is not here)."""
    if _active["hash"] != version:
        directory = _fetch(version)
        tree = json.loads((directory / ".hearth-tree").read_text())
        paths = [str(directory / p) if p != "." else str(directory) for p in tree["paths"]]
        gone = [str(d) for d in (_active["dir"],) if d is not None]
        # The controller's own copy of the tree: Ray puts the driver's working directory on the sys.path of
        # workers it starts on the driver's machine (local nodes), where it would shadow the synced version.
        shadowed = [tree["root"], *(str(Path(tree["root"]) / p) for p in tree["paths"] if p != ".")]
        _forget(gone)
        sys.path[:] = [p for p in sys.path if p not in _active["paths"]]
        os.chdir(directory)
        _active.update(hash=version, dir=directory, paths=paths, shadowed=shadowed)
    # every time: the version first on sys.path, and nothing of the controller's copy
    sys.path[:] = _active["paths"] + [p for p in sys.path if p not in _active["paths"] and p not in _active["shadowed"]]
    _forget(_active["shadowed"])


def _forget(directories: list[str]) -> None:
    """Drop the modules imported from these directories: the next import reads the active version. Never those
    of the running Python's installation, which may lie inside them (a .venv in the notebook's directory): Ray
    itself is among them, and a half-forgotten Ray cannot be imported again."""
    prefixes = tuple(d.rstrip(os.sep) + os.sep for d in directories)
    if not prefixes:
        return
    installed = tuple({str(Path(p).resolve()).rstrip(os.sep) + os.sep for p in (sys.prefix, sys.base_prefix,
                                                                               sys.exec_prefix)})
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if origin.startswith(prefixes) and not origin.startswith(installed) and "site-packages" not in origin.split(os.sep):
            del sys.modules[name]


def _fetch(version: str) -> Path:
    from provisioner.userdirs import private_dir

    base = private_dir(Path(tempfile.gettempdir()) / f"hearth-code-{os.geteuid()}", what="code directory",
                       fix="Remove it (as root if another user made it): code there could be swapped.")
    directory = base / version
    if directory.is_dir():
        return directory
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if directory.is_dir():  # another worker on this node fetched it meanwhile
            return directory
        from ray.experimental.internal_kv import _internal_kv_get

        data = None
        for _ in range(100):  # the kernel stores a version before any task needs it; a worker may start first
            data = _internal_kv_get(f"code:{version}", namespace=NAMESPACE)
            if data is not None:
                break
            time.sleep(0.1)
        if data is None:
            raise RuntimeError(f"code version {version} is not in the cluster's store")
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=base))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(staging, filter="data")
        os.rename(staging, directory)
    return directory


def setup_worker() -> None:
    """Ray's worker_process_setup_hook (set once per kernel connection): start in the current version."""
    from ray.experimental.internal_kv import _internal_kv_get

    current = _internal_kv_get(CURRENT, namespace=NAMESPACE)
    if current is not None:
        activate(current.decode())


def call(version: str | None, function: bytes, *args: Any, **kwargs: Any) -> Any:
    """A Pool call on its node: the code version it needs first, then the function (unpickled only now, so
    that what it refers to is imported from that version)."""
    import ray.cloudpickle

    if version is not None:
        activate(version)
    return ray.cloudpickle.loads(function)(*args, **kwargs)
