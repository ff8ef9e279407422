"""Whether the controller's Python interpreter can ride in the environment image, and how to stage it.

The guest image runs Debian bookworm's Python (3.11.2); a controller often runs another 3.11.x (3.11.7 from
pyenv here), and Ray warns on every worker about the patch difference. When the controller's interpreter is
*relocatable* the env image carries it, so the nodes run Ray with the controller's exact Python. It is
relocatable when all of these hold (checked on every pack, on the controller's own files):

- it is a self-contained build (pyenv, python-build-standalone as uv installs it, a /usr/local or /opt
  build), not a distribution's Python under /usr: distributions patch its layout and `site` module (Debian's
  looks for dist-packages), and the guest image already has that Python;
- its layout is `<base>/bin/pythonX.Y` with the standard library in `<base>/lib/pythonX.Y` (and lib-dynload
  in it), so that, copied anywhere, it finds its standard library from its own location (CPython's getpath);
- the binary's and libpython's shared-library needs are met by the guest (`GUEST_LIBRARIES`) or by the
  libpython that is shipped beside it, and the binary finds that libpython through its RUNPATH: a RUNPATH
  that names the build's absolute lib directory is rewritten in place (same length or shorter, padded with
  NULs; no patchelf needed) to `$ORIGIN/../lib`;
- no file needs a newer glibc than the guest's (2.36 for bookworm): the GLIBC_2.N versions each ELF file
  references;
- every lib-dynload module's libraries are in the guest, except modules nobody imports on a node
  (`OPTIONAL_MODULES`: tkinter, curses, readline, dbm, test modules): those are listed as unavailable.

Otherwise nodes use the guest image's own Python (the env image is then a venv over it; see envimage.py).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import shutil
import struct
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Debian bookworm's libc6 and the libraries its python3.11 depends on (libpython3.11-minimal, -stdlib) plus
# libstdc++/libgcc_s (apt needs them): every hearth guest image has them, since it installs python3.
GUEST_LIBRARIES = frozenset({
    "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
    "libutil.so.1", "libresolv.so.2", "libcrypt.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libz.so.1",
    "libbz2.so.1.0", "liblzma.so.5", "libffi.so.8", "libssl.so.3", "libcrypto.so.3", "libexpat.so.1",
    "libsqlite3.so.0", "libuuid.so.1", "libnsl.so.2", "libtirpc.so.3", "libdb-5.3.so", "libreadline.so.8",
    "libhistory.so.8", "libncursesw.so.6", "libpanelw.so.6", "libformw.so.6", "libmenuw.so.6", "libtinfo.so.6",
})
OPTIONAL_MODULES = re.compile(r"(_tkinter|_curses|_curses_panel|readline|_dbm|_gdbm|nis|ossaudiodev|spwd|"
                              r"_ctypes_test|_test\w*|xxlimited\w*|_xx\w*)\.")
# Not carried: the base's own site-packages (the venv's takes its place), the test suite, IDLE, and
# config-X.Y-*/ (a static libpython and Makefile, for building extensions).
STDLIB_LEFT_OUT = re.compile(r"site-packages|test|idlelib|turtledemo|config-\d.*")
NEW_RUNPATH = b"$ORIGIN/../lib"


@dataclass(frozen=True)
class Elf:
    needed: list[str]
    runpath: list[str]  # RUNPATH, or RPATH when there is no RUNPATH
    runpath_at: tuple[int, int] | None  # file offset and length of that string (to rewrite it)
    glibc: tuple[int, int]  # the newest GLIBC_2.N it references; (0, 0) for none


def read_elf(path: Path) -> Elf | None:
    """The dynamic-linking facts of an x86-64 ELF file, or None when it is not one (or has no sections)."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            return None
    with data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 18)[0] != 62:
            return None
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
        if dynamic is None:
            return Elf([], [], None, (0, 0))
        strtab = sections[dynamic[6]]
        strings = data[strtab[4]:strtab[4] + strtab[5]]

        def string(offset: int) -> str:
            return strings[offset:strings.index(b"\0", offset)].decode(errors="replace")

        needed, paths = [], {}
        for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 0:
                break
            if tag == 1:
                needed.append(string(value))
            elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
                paths[tag] = value
        found = [(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", strings)]
    chosen = paths.get(29, paths.get(15))
    runpath = string(chosen).split(":") if chosen is not None else []
    at = (strtab[4] + chosen, len(":".join(runpath).encode())) if chosen is not None else None
    return Elf(needed, [p for p in runpath if p], at, max(found, default=(0, 0)))


@dataclass(frozen=True)
class Interpreter:
    """The controller's interpreter, as the env image would carry it (`shipped`), or why it cannot."""
    version: str  # 3.11.7
    shipped: bool
    reason: str
    base: Path | None = None
    binary: Path | None = None
    libpython: Path | None = None
    stdlib: Path | None = None
    unavailable: list[str] = field(default_factory=list)  # stdlib modules that will not import on nodes
    size: int = 0  # bytes it adds to the image
    identity: dict = field(default_factory=dict)  # what the image key hashes


@functools.lru_cache(maxsize=4)
def interpreter(guest_glibc: tuple[int, int] = (2, 36)) -> Interpreter:
    """The running interpreter, judged for the guest (see the module docstring); judged once per process."""
    version = ".".join(map(str, sys.version_info[:3]))
    base = Path(sys.base_prefix)
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"

    def no(reason: str) -> Interpreter:
        return Interpreter(version, False, reason)

    if sys.platform != "linux" or os.uname().machine != "x86_64" or sys.implementation.name != "cpython":
        return no("only a CPython on x86-64 Linux can run in the guest")
    if base == Path("/usr") or not base.is_absolute():
        return no(f"{base} is a distribution's own Python: its layout and site module are the distribution's")
    base = base.resolve()  # compared with resolved paths below
    binary = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    if binary.parent != base / "bin" or stdlib != base / "lib" / minor or not (stdlib / "lib-dynload").is_dir():
        return no(f"its layout is not <prefix>/bin/{minor} with the standard library in <prefix>/lib/{minor}")
    elf = read_elf(binary)
    if elf is None:
        return no(f"{binary} is not an x86-64 ELF executable with dynamic sections")
    libpython, problems = None, []
    for name in elf.needed:
        if name.startswith("libpython"):
            origin = str(binary.parent)
            candidates = [Path(p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)) / name for p in elf.runpath]
            libpython = next((c.resolve() for c in candidates if c.is_file()), None)
            if libpython is None or libpython.parent != base / "lib":
                problems.append(f"{binary.name} finds {name} outside {base / 'lib'}")
            elif elf.runpath != ["$ORIGIN/../lib"] and (elf.runpath_at is None or elf.runpath_at[1] < len(NEW_RUNPATH)):
                problems.append(f"{binary.name}'s RUNPATH {':'.join(elf.runpath)} cannot be rewritten to $ORIGIN/../lib")
        elif name not in GUEST_LIBRARIES:
            problems.append(f"{binary.name} needs {name}, which the guest image lacks")
    newest = elf.glibc
    lib = read_elf(libpython) if libpython else None
    if lib is not None:
        problems += [f"{libpython.name} needs {n}, which the guest image lacks"
                     for n in lib.needed if n not in GUEST_LIBRARIES]
        newest = max(newest, lib.glibc)
    unavailable = []
    for module in sorted((stdlib / "lib-dynload").glob("*.so")):
        facts = read_elf(module)
        missing = [n for n in (facts.needed if facts else []) if n not in GUEST_LIBRARIES]
        if missing and OPTIONAL_MODULES.match(module.name):
            unavailable.append(f"{module.name.split('.')[0]} (needs {', '.join(missing)})")
        elif missing:
            problems.append(f"its {module.name.split('.')[0]} module needs {', '.join(missing)}, "
                            "which the guest image lacks")
        elif facts is not None:
            newest = max(newest, facts.glibc)
    if newest > guest_glibc:
        problems.append(f"it needs glibc {newest[0]}.{newest[1]}; the guest has {guest_glibc[0]}.{guest_glibc[1]}")
    if problems:
        return no("; ".join(problems))
    listing, size = _listing(stdlib)
    identity = {"version": sys.version, "binary": _sha256(binary), "libpython": _sha256(libpython) if libpython else None,
                "stdlib": listing}
    size += binary.stat().st_size + (libpython.stat().st_size if libpython else 0)
    return Interpreter(version, True, "relocatable: its libraries are in the guest image and it needs glibc "
                       f"<= {guest_glibc[0]}.{guest_glibc[1]}", base, binary, libpython, stdlib, unavailable, size, identity)


def stage(found: Interpreter, root: Path, link) -> None:
    """Put the interpreter under `root` as bin/, lib/libpython*, lib/pythonX.Y/ (`link(src, dst)` places a
    file: a hard link where it can). The binary is a copy with its RUNPATH rewritten to $ORIGIN/../lib."""
    assert found.shipped and found.binary and found.stdlib
    (root / "bin").mkdir(parents=True, exist_ok=True)
    binary = root / "bin" / found.binary.name
    shutil.copy2(found.binary, binary)
    elf = read_elf(binary)
    if found.libpython is not None and elf.runpath != ["$ORIGIN/../lib"]:
        offset, length = elf.runpath_at
        with open(binary, "r+b") as f:
            f.seek(offset)
            f.write(NEW_RUNPATH + b"\0" * (length - len(NEW_RUNPATH)))
        shutil.copystat(found.binary, binary)
    for alias in ("python3", "python"):
        if alias != binary.name:
            (root / "bin" / alias).symlink_to(binary.name)
    if found.libpython is not None:
        link(found.libpython, root / "lib" / found.libpython.name)
    target = root / "lib" / found.stdlib.name
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(os.scandir(found.stdlib), key=lambda e: e.name):
        if not STDLIB_LEFT_OUT.fullmatch(entry.name):
            link(Path(entry.path), target / entry.name)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listing(stdlib: Path) -> tuple[str, int]:
    """A digest of the standard library's file names and sizes (its content is fixed by the version and the
    binary), and their total size."""
    digest, total = hashlib.sha256(), 0
    for directory, dirs, files in os.walk(stdlib):
        top = directory == str(stdlib)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (top and STDLIB_LEFT_OUT.fullmatch(d)))
        for name in sorted(files):
            path = os.path.join(directory, name)
            size = os.lstat(path).st_size
            total += size
            digest.update(f"{os.path.relpath(path, stdlib)}\0{size}\n".encode())
    return digest.hexdigest(), total
