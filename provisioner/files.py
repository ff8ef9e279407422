"""Files that readers must never see half-written."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a temporary file beside `path` with `mode`, then rename it over `path`."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # a temporary file left by a crash keeps its old mode through O_CREAT; a secret must not
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temp, path)
