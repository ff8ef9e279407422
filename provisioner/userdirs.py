"""Where a controller keeps its files: per-user directories that only their user can touch, checked on every use.

    run directory    $HEARTH_RUN_DIR, else $XDG_RUNTIME_DIR/hearth when that is usable, else /tmp/hearth-<uid>;
                     one directory per cluster under it: Ray's sockets and files, the SSH-forwarded agent
                     sockets, the qemu backend's VM directories (and the `ifup` script QEMU runs as root)
    state directory  $HEARTH_STATE_DIR, else ~/.hearth; clusters/<name> under it: spec, state, events and the
                     cluster's Ray token (what `hearth status`, `hearth down` and the Jupyter extension read)

Why: a shared, predictable directory (the old /tmp/hearth) lets any local user who makes it first plant a
script that hearth runs as root, swap the agent socket a controller talks to (and so receive the cluster's
Ray token), point the dashboard proxy at a server of theirs, or just block everyone. So a directory is used
only when, at the moment of use:

- it is a real directory (not a symlink) owned by this user, with no permission for group or others
  (hearth makes each missing level mode 0700), and
- every directory above it, as written and as resolved, is owned by this user or root and writable by no one
  else, unless sticky (like /tmp: others can add entries there but not rename or remove ours), and no
  symlink on the way belongs to another user.

Anything else is refused with `UnsafeDirectory`, which names the directory, what is wrong and the fix, before
anything is written there: a directory is never silently used, repaired or taken over. Paths stay short: Ray
puts Unix sockets (at most 107 bytes) under a cluster's run directory, so the run root must leave room for a
cluster name.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from provisioner.errors import UnsafeDirectory

TMP = Path("/tmp")  # not tempfile.gettempdir(): $TMPDIR may be long, and Ray's sockets need a short path
RUN_ENV = "HEARTH_RUN_DIR"
STATE_ENV = "HEARTH_STATE_DIR"
# The longest socket Ray makes under a cluster's run directory: <dir>/n/1023/session_<date>_<pid>/sockets/plasma_store
MAX_RUN_DIR = 107 - len("/n/1023/session_2026-11-27_06-01-47_722129_4194304/sockets/plasma_store")
FIX = "Use a directory of your own (mkdir -m 700 DIR)."
NAME_ROOM = len("/hearth-abc123")  # a default cluster name, with its slash: what the run root must leave room for


def run_root() -> Path:
    """The directory under which each cluster gets its run directory: made (0700) if missing, then checked."""
    configured = os.environ.get(RUN_ENV)
    if configured:
        return private_dir(Path(configured), what=f"run directory ({RUN_ENV})",
                           fix=f"Point {RUN_ENV} at a directory of your own (mkdir -m 700 DIR), or unset it.")
    runtime = _xdg_runtime()
    default = runtime / "hearth" if runtime is not None else TMP / f"hearth-{os.geteuid()}"
    return private_dir(default, what="run directory",
                       fix=f"Remove {default} (as root if another user made it), or set {RUN_ENV} to a short "
                           "directory of your own (mkdir -m 700 DIR).")


def run_dir(name: str) -> Path:
    """A cluster's run directory: checked (the root now; the directory itself when `ensure` makes it)."""
    return run_root() / name


def state_root() -> Path:
    """Where each cluster's state directory lives (`clusters/` under the state directory), made and checked."""
    configured = os.environ.get(STATE_ENV)
    base = Path(configured or "~/.hearth").expanduser()
    what = f"state directory ({STATE_ENV})" if configured else "state directory"
    fix = (f"Point {STATE_ENV} at a directory of your own (mkdir -m 700 DIR), or unset it." if configured
           else f"Make {base} yours alone (chmod 700; rm -rf it, as root, if another user made it), or set "
                f"{STATE_ENV} to a directory of your own (mkdir -m 700 DIR).")
    private_dir(base, what=what, fix=fix)
    return private_dir(base / "clusters", what=what, fix=fix)


def ensure(directory: Path, what: str = "directory") -> Path:
    """`directory` made (0700) where missing and checked: for a cluster's own run or state directory, and the
    directories under it that hold what hearth runs or connects to."""
    return private_dir(directory, what=what, fix=f"Remove {directory}, or set {RUN_ENV} and {STATE_ENV} to "
                                                  "directories of your own (mkdir -m 700 DIR).")


def private_dir(path: Path, *, what: str, fix: str) -> Path:
    """`path`, made where missing (each new level mode 0700) and checked as the module says; `UnsafeDirectory`
    naming the problem and `fix` otherwise."""
    path = Path(os.path.abspath(path.expanduser()))
    missing = []
    for level in (path, *path.parents):
        if os.path.lexists(level):
            break
        missing.append(level)
    _check_above(path, what, fix)  # before anything is made under a parent someone else controls
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile (by us in another process, or by someone else): checked below
            pass
        except OSError as error:
            raise UnsafeDirectory(f"cannot make the {what} {level}: {error.strerror}. {fix}") from None
    check(path, what=what, fix=fix)
    return path


def check(path: Path, *, what: str = "directory", fix: str = FIX) -> None:
    """Raise `UnsafeDirectory` unless `path` is this user's private directory under safe parents."""
    path = Path(os.path.abspath(path))
    _check_above(path, what, fix)
    try:
        info = os.lstat(path)
    except OSError as error:
        raise UnsafeDirectory(f"the {what} {path} cannot be used: {error.strerror}. {fix}") from None
    me = os.geteuid()
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(f"the {what} {path} is a symlink (to {os.readlink(path)}): whoever controls its target "
                              f"controls what hearth runs and connects to there. {fix}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"the {what} {path} is not a directory. {fix}")
    if info.st_uid != me:
        raise UnsafeDirectory(f"the {what} {path} belongs to uid {info.st_uid}, not to you (uid {me}): another user "
                              "made it, and could plant files there that hearth runs, or swap its sockets. "
                              + fix)
    if info.st_mode & 0o077:
        raise UnsafeDirectory(f"the {what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may use it (it "
                              f"holds the cluster's sockets, files and token). chmod 700 {path} if it is yours to use. {fix}")


def _check_above(path: Path, what: str, fix: str) -> None:
    """Every existing directory above `path` (as written, then as resolved): owned by this user or root, and
    writable by no one else unless sticky; no symlink of another user's on the way."""
    me = os.geteuid()
    for chain in (path.parents, Path(os.path.realpath(path)).parents):
        for parent in reversed(chain):
            try:
                info = os.lstat(parent)
            except FileNotFoundError:
                break
            except OSError as error:
                raise UnsafeDirectory(f"the {what} {path} cannot be used: {parent}: {error.strerror}. {fix}") from None
            if info.st_uid not in (me, 0):
                kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "a directory"
                raise UnsafeDirectory(f"the {what} {path} lies under {parent}, {kind} of uid {info.st_uid}, who could "
                                      f"swap what is under it. {fix}")
            if stat.S_ISDIR(info.st_mode) and info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
                raise UnsafeDirectory(f"the {what} {path} lies under {parent} (mode {stat.S_IMODE(info.st_mode):04o}), "
                                      f"which others can write to and so swap what is under it. {fix}")


def _xdg_runtime() -> Path | None:
    """$XDG_RUNTIME_DIR when it is usable: absolute, this user's, 0700 (as the XDG spec promises), and short
    enough for Ray's sockets under a cluster directory in it. Otherwise None: /tmp/hearth-<uid> is used."""
    value = os.environ.get("XDG_RUNTIME_DIR")
    if not value or not os.path.isabs(value):
        return None
    try:
        info = os.lstat(value)
    except OSError:
        return None
    usable = (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077
              and len(value) + len("/hearth") + NAME_ROOM <= MAX_RUN_DIR)
    return Path(value) if usable else None

