"""Where a cluster's Ray token must never be: searched for by its value, never by the word "token" (which a
page may well say). Its one home is the `token` file (mode 0600) in the cluster's state directory; guests get
it over the guest channel and Ray processes in their environment (/proc/<pid>/environ, readable by its user
alone)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_FILE = 64 << 20  # larger files (an env image, a disk) hold no logs


def token_leaks(token: str, *, dirs: tuple[Path, ...] = (), texts: dict[str, str] | None = None) -> list[str]:
    """Every place the token's value appears: a live process's command line, a file under `dirs` (logs, state,
    Ray's session files; the 0600 `token` file itself excepted), or one of `texts` (status JSON, a page, a
    view's HTML: name -> text)."""
    assert len(token) >= 16, "a real token, or this search finds nothing"
    needle = token.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            shown = cmdline.replace(b"\0", b" ")[:100]
            found.append(f"the command line of pid {pid}: {shown!r}")
    for directory in dirs:
        for path in Path(directory).rglob("*"):
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE:
                    continue
                if path.name == "token" and stat.S_IMODE(info.st_mode) == 0o600:
                    continue
                if needle in path.read_bytes():
                    found.append(f"the file {path}")
            except OSError:
                continue  # gone meanwhile (a log rotated, a socket)
    found += [f"the {name}" for name, text in (texts or {}).items() if token in text]
    return found
