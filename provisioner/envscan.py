"""What the controller has installed, as the environment image would hold it, and the key that names it.

`scan()` reads the site-packages of a prefix (default: the running interpreter's `sys.prefix`):

- every distribution (importlib.metadata): its name and version, its RECORD, and the oldest glibc its wheel
  tags accept (`manylinux_2_28_x86_64` -> 2.28; a wheel tagged `linux_x86_64` was built on this machine, so
  its compiled files are asked instead);
- editable installs: setuptools' PEP 660 finders (`__editable___*_finder.py`, whose MAPPING names each
  package's source directory) become trees copied into site-packages as plain packages; directories that
  `.pth` files add to sys.path (`setup.py develop`, src-layout editables, path installs) become trees under
  `paths/`, and the `.pth` files are rewritten to reach them by relative paths;
- loose files in site-packages that no RECORD names.

The key is a sha256 over what is installed: each distribution's name, version and RECORD (the lines inside
site-packages, less .pyc files and the files that differ between two installs of the same thing: INSTALLER,
REQUESTED, direct_url.json, the editable hooks, which name absolute paths), the content of every tree
(.pyc and __pycache__ excluded; hidden entries such as .git and directories that are venvs skipped), the
.pth files as rewritten, the interpreter's identity when it ships, and the packer's own settings. So two
controllers with the same environment get the same key, and deciding "already packed" reads metadata only
(about 0.1 s for this repository's 549 MB .venv).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib.metadata import distributions
from pathlib import Path

from provisioner.errors import EnvError
from provisioner.interpreter import Interpreter, interpreter, read_elf

SKIPPED_RECORD = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
EDITABLE_HOOK = re.compile(r"__editable__.*")
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


@dataclass
class Dist:
    name: str
    version: str
    size: int  # bytes inside site-packages, from RECORD
    glibc: tuple[int, int] = (0, 0)  # the oldest glibc its wheel tags accept; (0, 0): any
    tag: str = ""  # the platform tag that says so


@dataclass
class Tree:
    """A directory or file placed in the image from outside site-packages (editable and path installs)."""
    source: Path
    target: str  # relative to the image root
    digest: str = ""
    size: int = 0
    glibc: tuple[int, int] = (0, 0)  # of the compiled files in it


@dataclass
class Environment:
    """What is installed, as the image would hold it. `scan()` makes one."""
    site_packages: list[Path]
    python: str  # major.minor
    interpreter: Interpreter
    dists: list[Dist] = field(default_factory=list)
    trees: list[Tree] = field(default_factory=list)  # editable and path installs
    loose: list[Tree] = field(default_factory=list)  # files in site-packages no RECORD names
    pth: dict[str, str] = field(default_factory=dict)  # .pth files as the image holds them
    key: str = ""

    @property
    def site_target(self) -> str:
        return f"lib/python{self.python}/site-packages"

    @property
    def size(self) -> int:
        carried = sum(d.size for d in self.dists) + sum(t.size for t in (*self.trees, *self.loose))
        return carried + (self.interpreter.size if self.interpreter.shipped else 0)


def scan(prefix: Path | None = None, *, with_interpreter: bool = True, guest_glibc=(2, 36),
         packer: dict | None = None) -> Environment:
    """Read what `prefix` (default: this interpreter's sys.prefix) has installed and compute its key.
    `with_interpreter`: carry the running interpreter when it is relocatable (False: never). `packer`: the
    packer's settings (format version, mkfs options), part of the key."""
    prefix = Path(prefix or sys.prefix)
    scheme = "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix"
    paths = sysconfig.get_paths(scheme, vars={"base": str(prefix), "platbase": str(prefix)})
    site = [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"])) if Path(p).is_dir()]
    if not site:
        raise EnvError(f"{prefix} has no site-packages ({paths['purelib']}): run hearth from a virtual environment")
    found = interpreter(guest_glibc)
    if not with_interpreter and found.shipped:
        found = Interpreter(found.version, False, "left out as asked (--no-interpreter)")
    env = Environment(site, f"{sys.version_info[0]}.{sys.version_info[1]}", found)
    owned: set[str] = set()
    records = []
    for directory in site:
        for dist in distributions(path=[str(directory)]):
            record, top = _record(dist.read_text("RECORD") or "")
            owned |= top
            tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                    if line.startswith("Tag:")]
            glibc, tag = _glibc_of_tags(tags)
            entry = Dist(*_name_version(dist), record.size, glibc, tag)
            if any(t.split("-")[-1].startswith("linux_") for t in tags):  # built here: ask its ELF files
                compiled = [Path(directory, f) for f in record.files if f.endswith(".so") or ".so." in f]
                entry.glibc, entry.tag = _glibc_of_files(compiled), "a wheel built for this machine"
            env.dists.append(entry)
            records.append([entry.name.lower(), entry.version, record.digest])
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.endswith(".pth"):
                _pth(env, directory, Path(entry.path))
            elif EDITABLE_HOOK.match(entry.name) and entry.name.endswith("_finder.py"):
                _finder(env, Path(entry.path))
            elif entry.name not in owned and entry.name != "__pycache__":
                env.loose.append(_tree(Path(entry.path), f"{env.site_target}/{entry.name}"))
    for tree in env.trees:
        done = _tree(tree.source, tree.target)
        tree.digest, tree.size, tree.glibc = done.digest, done.size, done.glibc
    document = {"packer": packer or {}, "python": env.python,
                "interpreter": found.identity if found.shipped else None, "dists": sorted(records),
                "trees": sorted([t.target, t.digest] for t in (*env.trees, *env.loose)), "pth": env.pth}
    env.key = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    return env


@dataclass
class _Record:
    digest: str
    size: int
    files: list[str]


def _name_version(dist) -> tuple[str, str]:
    """Name and version from the metadata's headers (the email parser would read whole descriptions)."""
    head = (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").split("\n\n", 1)[0]
    fields = dict(re.findall(r"^(Name|Version):\s*(.*?)\s*$", head, re.M))
    return fields.get("Name") or dist.metadata["Name"] or "unknown", fields.get("Version") or dist.version


def _record(text: str) -> tuple[_Record, set[str]]:
    """A RECORD's digest (the lines that say what is installed) and the top-level names it owns."""
    lines, size, files, top = [], 0, [], set()
    for row in csv.reader(io.StringIO(text)):
        if not row or row[0].startswith(("..", "/")):
            continue
        path = row[0]
        name = path.rsplit("/", 1)[-1]
        top.add(path.split("/", 1)[0])
        size += int(row[2]) if len(row) > 2 and row[2].isdigit() else 0
        files.append(path)
        if not name.endswith(".pyc") and name not in SKIPPED_RECORD and not EDITABLE_HOOK.match(name):
            lines.append(",".join(row[:3]))
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return _Record(digest, size, files), top


def _glibc_of_tags(tags: list[str]) -> tuple[tuple[int, int], str]:
    """The oldest glibc any of a wheel's platform tags accepts (the wheel installs where one matches)."""
    wanted = []
    for tag in tags:
        for platform in tag.split("-")[-1].split("."):  # a tag may be compressed: manylinux_2_17_x.manylinux2014_x
            found = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", platform)
            legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_\w+", platform)
            if found:
                wanted.append(((int(found[1]), int(found[2])), platform))
            elif legacy:
                wanted.append((LEGACY_MANYLINUX[legacy[1]], platform))
    return min(wanted) if wanted else ((0, 0), "")


def _glibc_of_files(paths: list[Path]) -> tuple[int, int]:
    """The newest GLIBC_2.N that these compiled files reference."""
    facts = [read_elf(p) for p in paths if p.is_file() and not p.is_symlink()]
    return max((f.glibc for f in facts if f), default=(0, 0))


def _pth(env: Environment, site: Path, pth: Path) -> None:
    """Keep a .pth file's import lines (not setuptools' editable hooks: their packages are copied in) and
    turn each directory it puts on sys.path, outside site-packages, into a tree under paths/."""
    lines = []
    for line in pth.read_text(errors="replace").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(("import ", "import\t")):
            if "__editable___" not in line:
                lines.append(line)
            continue
        directory = Path(os.path.normpath(site / line.rstrip()))
        if not directory.is_dir():
            continue
        if directory.is_relative_to(site):
            lines.append(os.path.relpath(directory, site))
            continue
        target = f"paths/{len(env.trees)}-{directory.name}"
        env.trees.append(Tree(directory, target))
        lines.append(os.path.relpath(target, env.site_target))
    if lines or not pth.name.startswith("__editable__."):
        env.pth[pth.name] = "".join(f"{line}\n" for line in lines)


def _finder(env: Environment, finder: Path) -> None:
    """setuptools' PEP 660 editable finder: MAPPING names each package's source; copy them in as packages."""
    for node in ast.parse(finder.read_text()).body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign):
            target = node.targets[0]
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("MAPPING", "NAMESPACES") and node.value is not None:
            value = ast.literal_eval(node.value)
            for name, where in sorted(value.items()):
                for source in ([where] if isinstance(where, str) else where):
                    source = Path(source)
                    suffix = source.suffix if source.is_file() else ""
                    env.trees.append(Tree(source, f"{env.site_target}/{name.replace('.', '/')}{suffix}"))


def _tree(source: Path, target: str) -> Tree:
    """Digest (content, .pyc and __pycache__ left out; hidden entries and venvs skipped), size and glibc."""
    digest, size, compiled = hashlib.sha256(), 0, []
    for path, relative in walk_tree(source):
        if path.suffix == ".pyc":
            continue
        with open(path, "rb") as f:
            content = hashlib.file_digest(f, "sha256").digest()
            size += f.tell()
        digest.update(f"{relative}\0".encode() + content)
        if path.name.endswith(".so") or ".so." in path.name:
            compiled.append(path)
    return Tree(source, target, digest.hexdigest(), size, _glibc_of_files(compiled))


def walk_tree(source: Path, pyc: bool = False):
    """(path, relative name) of every file under `source` (or `source` itself), in a stable order; skips
    hidden entries (.git, .venv), directories that are virtual environments, and __pycache__ unless `pyc`."""
    if not source.is_dir():
        if source.is_file():
            yield source, ""
        return
    for directory, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if (pyc or d != "__pycache__") and not d.startswith(".")
                         and not os.path.exists(os.path.join(directory, d, "pyvenv.cfg")))
        for name in sorted(files):
            path = Path(directory, name)
            if not name.startswith(".") and path.is_file():
                yield path, path.relative_to(source).as_posix()
