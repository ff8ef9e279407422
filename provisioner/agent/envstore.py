"""Env images on a host: content-addressed files in the agent's state directory, sent by controllers.

    <state_dir>/envs/<sha256>.img           complete and verified (mode 0444): what VMs attach, read-only
    <state_dir>/envs/<sha256>.<size>.part   an upload under way or interrupted: the image's first bytes

An upload (`receive`) appends a request body at the offset the controller names, which must be the length of
the .part file, so a dropped connection resumes where it stopped, across an agent restart too. When the last
byte arrives the digest is compared with the name: only a match is synced and renamed to .img, so an image is
never half-visible; a mismatch deletes the .part and refuses the upload, saying so. The digest is kept up to
date as bytes arrive (a restarted agent re-reads the .part once, on resume).

Bounded: one upload per image at a time (409); the declared size is checked against the body and no byte
beyond it is taken; an upload is refused before a byte is written (507) when the filesystem's free space,
less what this upload and the others under way still need, would fall under the margin:
`HEARTH_AGENT_ENV_MARGIN`, in bytes ("5G", "500M", "1073741824") or as a share of the filesystem ("10%");
default 5 GiB. Deleting is refused while a VM uses the image: the caller passes the images in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from provisioner.errors import AgentError

SHA256 = re.compile(r"[0-9a-f]{64}")
SIZE_HEADER = "X-Hearth-Env-Size"  # an upload's whole image size (its body is the image from ?offset= on)
DEFAULT_MARGIN = "5G"
MAX_SIZE = 1 << 40  # no env image is a terabyte: a bigger size header is a mistake


class EnvStoreError(AgentError):
    """A refused env image request; `status` is what the API answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_margin(text: str | int) -> int | float:
    """Bytes to keep free ("5G", "500M", a number), or a share of the filesystem ("10%", a float < 1)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|%)?\s*", str(text), re.I)
    if not found:
        raise AgentError(f"env image margin {text!r} is neither a size (5G, 500M, bytes) nor a share of the disk "
                         "(10%): fix HEARTH_AGENT_ENV_MARGIN")
    number, unit = float(found[1]), (found[2] or "").upper()
    if unit == "%":
        if number >= 100:
            raise AgentError(f"env image margin {text!r}: a share of the disk is under 100%")
        return number / 100
    return int(number * 1024 ** ("KMGT".index(unit[0]) + 1 if unit else 0))


class EnvStore:
    def __init__(self, directory: Path, margin: str | int = DEFAULT_MARGIN) -> None:
        self.margin = parse_margin(margin)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = directory
        self._uploading: dict[str, int] = {}  # image -> bytes it still needs, while an upload runs
        self._digests: dict[str, tuple[Any, int]] = {}  # image -> (sha256 state, bytes it has read)

    # -- reading -----------------------------------------------------------------------------------------
    def list(self) -> dict[str, Any]:
        """Every image here, complete or partial, and the disk they live on."""
        found = {}
        for path in sorted(self.dir.iterdir()):
            sha, _, rest = path.name.partition(".")
            if not SHA256.fullmatch(sha):
                continue
            if rest == "img":
                found[sha] = {"sha256": sha, "complete": True, "size": path.stat().st_size}
            elif rest.endswith(".part") and sha not in found:
                found[sha] = {"sha256": sha, "complete": False, "size": int(rest.split(".")[0]),
                              "received": path.stat().st_size, "uploading": sha in self._uploading}
        free, margin = self._disk()
        return {"images": list(found.values()), "free_bytes": free, "margin_bytes": margin}

    def path(self, sha: str) -> Path:
        """Where a complete image is (whether or not it is there yet)."""
        _check(sha)
        return self.dir / f"{sha}.img"

    def get(self, sha: str, size: int | None = None) -> dict[str, Any]:
        """One image: complete, or how many bytes have arrived. With `size` (the image's), also whether the
        disk can take the rest: 507 when it cannot."""
        _check(sha)
        image = self.dir / f"{sha}.img"
        if image.exists():
            return {"sha256": sha, "complete": True, "size": image.stat().st_size}
        part = self._part(sha, size)
        received = part.stat().st_size if part is not None and part.exists() else 0
        if size is not None:
            _check_size(size)
            if sha not in self._uploading:
                self._room(sha, size - received)
        elif part is None:
            raise EnvStoreError(f"no env image {sha[:12]} on this host", 404)
        return {"sha256": sha, "complete": False, "size": size or int(part.name.split(".")[1]), "received": received,
                "uploading": sha in self._uploading}

    # -- receiving ---------------------------------------------------------------------------------------
    async def receive(self, sha: str, offset: int, size: int, chunks: AsyncIterator[bytes],
                      length: int | None = None) -> dict[str, Any]:
        """Append `chunks` at `offset` to the image's .part; verify and publish it once `size` bytes are in."""
        _check(sha)
        _check_size(size)
        if (self.dir / f"{sha}.img").exists():
            return self.get(sha)
        if sha in self._uploading:
            raise EnvStoreError(f"env image {sha[:12]} is being received from another connection: wait for it", 409)
        part = self._part(sha, size)
        for stale in self.dir.glob(f"{sha}.*.part"):
            if stale != part:  # declared another size: it cannot be this image's start
                stale.unlink()
        received = part.stat().st_size if part.exists() else 0
        if offset != received:
            raise EnvStoreError(f"env image {sha[:12]}: the host has {received} bytes; resume from offset {received}", 409)
        if length is not None and offset + length != size:
            raise EnvStoreError(f"env image {sha[:12]}: offset {offset} plus a {length}-byte body is not its size {size}")
        self._room(sha, size - received)
        self._uploading[sha] = size - received
        try:
            digest = await self._digest(sha, part, received)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                async for chunk in chunks:
                    if received + len(chunk) > size:
                        part.unlink()
                        self._digests.pop(sha, None)
                        raise EnvStoreError(f"env image {sha[:12]}: more bytes than its declared size {size}; "
                                            "what had arrived was removed")
                    _write(fd, chunk, received)
                    received += len(chunk)
                    digest.update(chunk)
                    self._digests[sha] = (digest, received)
                    self._uploading[sha] = size - received
                if received == size:
                    await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            if received < size:
                return {"sha256": sha, "complete": False, "size": size, "received": received}
            return await self._publish(sha, part, self._digests.pop(sha)[0].hexdigest())
        finally:
            self._uploading.pop(sha, None)

    async def _digest(self, sha: str, part: Path, received: int):
        """The sha256 state after the .part's bytes: kept from the last chunk, or read again (after a restart)."""
        kept = self._digests.get(sha)
        if kept is not None and kept[1] == received:
            return kept[0]

        def read() -> Any:
            digest = hashlib.sha256()
            if received:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
            return digest

        digest = await asyncio.to_thread(read)
        self._digests[sha] = (digest, received)
        return digest

    async def _publish(self, sha: str, part: Path, digest: str) -> dict[str, Any]:
        if digest != sha:
            part.unlink()
            raise EnvStoreError(f"env image {sha[:12]} arrived with sha256 {digest[:12]}: it was corrupted on the way "
                                "and has been removed; send it again")
        os.chmod(part, 0o444)
        os.replace(part, self.dir / f"{sha}.img")
        directory = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.get(sha)

    # -- removing ----------------------------------------------------------------------------------------
    def delete(self, sha: str, in_use: set[str]) -> dict[str, Any]:
        """Remove an image (or what arrived of it). Refused while a VM uses it or it is being received."""
        _check(sha)
        if sha in in_use:
            raise EnvStoreError(f"env image {sha[:12]} is used by a VM on this host: it can go once that VM has "
                                "stopped", 409)
        if sha in self._uploading:
            raise EnvStoreError(f"env image {sha[:12]} is being received: delete it once the upload has ended", 409)
        paths = [p for p in (self.dir / f"{sha}.img", *self.dir.glob(f"{sha}.*.part")) if p.exists()]
        if not paths:
            raise EnvStoreError(f"no env image {sha[:12]} on this host", 404)
        freed = 0
        for path in paths:
            freed += path.stat().st_size
            path.unlink()
        self._digests.pop(sha, None)
        return {"deleted": sha, "bytes": freed}

    # -- inside ------------------------------------------------------------------------------------------
    def _part(self, sha: str, size: int | None) -> Path | None:
        if size is not None:
            return self.dir / f"{sha}.{size}.part"
        return next(iter(self.dir.glob(f"{sha}.*.part")), None)

    def _disk(self) -> tuple[int, int]:
        facts = os.statvfs(self.dir)
        total = facts.f_blocks * facts.f_frsize
        return facts.f_bavail * facts.f_frsize, int(self.margin * total) if isinstance(self.margin, float) else self.margin

    def _room(self, sha: str, needed: int) -> None:
        free, margin = self._disk()
        others = sum(left for other, left in self._uploading.items() if other != sha)
        if free - others - needed < margin:
            raise EnvStoreError(
                f"env image {sha[:12]} needs {_size(needed)} more and this host has {_size(free)} free"
                + (f" ({_size(others)} promised to uploads under way)" if others else "")
                + f"; the agent keeps {_size(margin)} free (HEARTH_AGENT_ENV_MARGIN): free space in {self.dir}, "
                "or remove the env images no VM uses (hearth env prune --hosts HOSTS)", 507)


def _write(fd: int, data: bytes, at: int) -> None:
    """All of `data`, or nothing: a failed write (a full disk) is cut back to where it started."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.ftruncate(fd, at)
        raise


def _check(sha: str) -> None:
    if not SHA256.fullmatch(sha):
        raise EnvStoreError(f"{sha[:80]!r} is not an env image name: 64 lower-case hex digits (its sha256)")


def _check_size(size: int) -> None:
    if not 0 < size <= MAX_SIZE:
        raise EnvStoreError(f"env image size {size} is not between 1 byte and 1 TiB")


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"
