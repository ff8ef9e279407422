"""Every host path hearth touches is resolved under one root directory.

The default root is `/`; `--host-root DIR` or `HEARTH_HOST_ROOT` moves it, which is how the tests run
against sysfs-shaped trees and how an admin inspects a host image. A path is built from the root and
components, and its real location (symlinks followed, as sysfs is full of them) must stay inside the
root: nothing read from a user, a file or a symlink can walk out of it, and a write never lands outside.
"""

from __future__ import annotations

import os
from pathlib import Path

from vfio.errors import HostRootError

ENV_VAR = "HEARTH_HOST_ROOT"


class HostRoot:
    """A root directory that host paths (`/sys`, `/proc`, `/dev`, `/etc`) are resolved under."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        raw = os.fspath(root) if root is not None else os.environ.get(ENV_VAR) or "/"
        path = Path(raw)
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_dir():
            raise HostRootError(
                f"host root {raw!r} is not a directory; pass --host-root DIR (or set {ENV_VAR}) "
                "to an existing directory, or leave it unset for /"
            )
        self.root = path.resolve()

    @property
    def is_live(self) -> bool:
        """True when the root is this machine's own `/`, so live interfaces (NVML) describe it."""
        return self.root == Path("/")

    def path(self, *parts: str) -> Path:
        """The path of host path `parts` (e.g. `"sys/bus/pci"`, address) under the root.

        Raises `HostRootError` when a component is absolute or `..`, or when symlinks take the real
        location outside the root. Components that carry addresses are validated before they get here;
        this check is the second fence.
        """
        for part in parts:
            for piece in part.split("/"):
                if piece == "..":
                    raise HostRootError(f"refusing host path component {part!r}: '..' is not allowed")
        joined = self.root.joinpath(*(p.lstrip("/") for p in parts))
        real = Path(os.path.realpath(joined))
        if real != self.root and self.root not in real.parents:
            raise HostRootError(
                f"{joined} resolves to {real}, outside the host root {self.root}; "
                "a symlink in the host tree points out of it"
            )
        return joined

    def __repr__(self) -> str:
        return f"HostRoot({str(self.root)!r})"
