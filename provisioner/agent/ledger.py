"""What the agent has handed out, on disk, so that a restart neither loses nor double-counts a lease.

One JSON file per VM (`vms/<id>.json`, mode 0600: it holds the guest's config, Ray token included): its
controller, GPUs and their IOMMU-group functions, vsock CID, tap, address, whether `vm.boot` answered, and
whether it is quarantined (its VMM outlived SIGKILL: what it holds is not free until it has gone).
`controllers.json` (0600) holds each controller's lease: its expiry (wall clock, so it survives a restart),
the uid that opened it, and the sha256 of the secret it was given (auth.py); never the secret itself. A file
is written, atomically, before the thing it records is made, and removed after the thing is gone.

`leases.log` is an append-only audit trail (JSON lines: lease, release, end, quarantine, sweep), so anyone
can check that no GPU was ever leased twice. A line that cannot be written (a full disk) is kept and written
with the next one, in order. One agent per state directory: it holds `agent.lock` while it runs.

A full disk refuses a new lease (507, naming the directory) before anything is made.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from provisioner.errors import AgentError, LeaseConflict
from provisioner.files import write_atomic

RECORD_S = 1.0  # a lease renewal that moves its end by less is not written to disk (see Ledger.renew)
MIN_TTL_S = 1.0
MAX_TTL_S = 3600.0  # a controller lease that is never renewed ends within this: no VM is immortal
RETIRED_S = 600.0  # how long a controller whose lease ended may still read how its VMs ended


class StateDiskFull(AgentError):
    status = 507


class VmLease(BaseModel):
    id: str
    controller: str
    gpus: list[str] = []
    functions: list[str] = []  # the GPUs' IOMMU-group companions: leased with them
    cid: int
    tap: str | None = None
    address: str | None = None  # the guest's, with prefix: 10.77.1.5/24
    mac: str | None = None
    booted: bool = False  # vm.boot answered: a restarted agent may adopt it
    created_at: float
    request: dict[str, Any]  # the create request, to rebuild the VM's spec on adoption
    quarantined: str | None = None  # why its GPUs, tap and address are kept: its VMM outlived SIGKILL

    @property
    def devices(self) -> list[str]:
        return [*self.gpus, *self.functions]


class ControllerLease(BaseModel):
    """One controller's lease on this host: how long its VMs are kept, and who may act for it."""

    model_config = ConfigDict(extra="forbid")
    expires: float  # time.time() it lapses at
    uid: int | None = None  # the peer uid that opened it (None: a lease from before identities)
    secret_sha256: str | None = None  # its secret's digest (auth.py); None: from before identities


def check_ttl(ttl: float) -> float:
    """A lease's time to live: finite, and from MIN_TTL_S to MAX_TTL_S seconds."""
    if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise AgentError(f"a lease's ttl is {MIN_TTL_S:g} to {MAX_TTL_S:g} seconds, not {ttl!r}: renew more often "
                         "rather than for longer (a lease that is never renewed must end)")
    return float(ttl)


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        (state_dir / "vms").mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        self._lock = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise AgentError(f"another hearth agent holds {state_dir}/agent.lock: one agent per state directory "
                             "(stop it, or give this one its own --state-dir)") from None
        self.vms: dict[str, VmLease] = {}
        for path in sorted((state_dir / "vms").glob("*.json")):
            lease = VmLease.model_validate_json(path.read_text())
            self.vms[lease.id] = lease
        controllers = state_dir / "controllers.json"
        saved = json.loads(controllers.read_text()) if controllers.exists() else {}
        self.controllers: dict[str, ControllerLease] = {  # a bare expiry: the format before identities
            name: ControllerLease(expires=v) if isinstance(v, (int, float)) else ControllerLease.model_validate(v)
            for name, v in saved.items()}
        self._recorded = {n: l.expires for n, l in self.controllers.items()}  # what controllers.json says
        self._unwritten: list[str] = []  # audit lines a full disk refused, written before the next one
        # Leases that lapsed or were released, kept in memory for RETIRED_S: their controllers may still ask how
        # their VMs ended (auth.py lets them read), but create nothing
        self.retired: dict[str, ControllerLease] = {}

    def close(self) -> None:
        os.close(self._lock)

    # -- leases ----------------------------------------------------------------------------------
    def holder(self, device: str) -> str | None:
        return next((v.id for v in self.vms.values() if device in v.devices), None)

    def reserve(self, lease: VmLease) -> None:
        """Record a new VM's lease, or `LeaseConflict` naming who holds what it wants; `StateDiskFull` (and
        nothing recorded) when it cannot be written."""
        taken = {d: self.holder(d) for d in lease.devices if self.holder(d) not in (None, lease.id)}
        if taken:
            raise LeaseConflict("GPU " + ", ".join(f"{d} is leased to VM {v}" for d, v in taken.items())
                                + ": place the node on free GPUs (GET /v1/gpus)")
        self.save(lease)
        self.vms[lease.id] = lease
        self.log("lease", lease.id, controller=lease.controller, devices=lease.devices)

    def save(self, lease: VmLease) -> None:
        with self._writing("a VM's lease"):
            write_atomic(self.dir / "vms" / f"{lease.id}.json", lease.model_dump_json(), 0o600)

    def release(self, vm_id: str, why: str) -> None:
        lease = self.vms.pop(vm_id, None)
        if lease is not None:
            (self.dir / "vms" / f"{vm_id}.json").unlink(missing_ok=True)
            self.log("release", vm_id, devices=lease.devices, why=why)

    def quarantine(self, vm_id: str, why: str) -> None:
        """Keep a VM's lease (GPUs, tap, address) because its VMM outlived SIGKILL; it is released once the
        VMM has gone (host.py)."""
        lease = self.vms[vm_id]
        if lease.quarantined is None:
            lease.quarantined = why
            self.log("quarantine", vm_id, devices=lease.devices, why=why)
        try:
            self.save(lease)
        except StateDiskFull as error:  # kept in memory; a restart finds the VMM again by its command line
            print(f"hearth agent: {error}", file=sys.stderr, flush=True)

    def held_by(self, vm_id: str) -> list[str]:
        """The devices the audit log says `vm_id` holds (leased, not released): what a VM whose record was lost
        held, so that its end is logged and the log still replays (the sweep)."""
        held: list[str] = []
        try:
            lines = (self.dir / "leases.log").read_text().splitlines()
        except OSError:
            return held
        for line in lines:
            with suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                if entry["subject"] == vm_id and entry["op"] == "lease":
                    held = list(entry.get("devices", []))
                elif entry["subject"] == vm_id and entry["op"] == "release":
                    held = []
        return held

    # -- controllers -----------------------------------------------------------------------------
    def open(self, controller: str, ttl: float, uid: int, secret_sha256: str) -> float:
        """A new controller lease, owned by `uid` and whoever holds the secret behind `secret_sha256`."""
        lease = ControllerLease(expires=time.time() + check_ttl(ttl), uid=uid, secret_sha256=secret_sha256)
        self._save_controllers({**self.controllers, controller: lease})
        self.controllers[controller] = lease
        self.log("open", controller, uid=uid)
        return lease.expires

    def renew(self, controller: str, ttl: float) -> float:
        """The controller's lease now ends `ttl` from now. Written to disk (for a restarted agent) unless that
        moves it by less than RECORD_S: every VM a controller creates renews its lease, and a file write per VM,
        in the agent's one thread, held up every boot of a large cluster."""
        lease = self.controllers[controller]
        expires = time.time() + check_ttl(ttl)
        lease.expires = expires
        if abs(expires - self._recorded.get(controller, 0.0)) >= RECORD_S:
            try:
                self._save_controllers(self.controllers)
            except StateDiskFull as error:  # the lease holds in memory; it is written with the next change
                print(f"hearth agent: {error}", file=sys.stderr, flush=True)
        return expires

    def drop(self, controller: str, why: str) -> None:
        lease = self.controllers.pop(controller, None)
        if lease is not None:
            self.retired[controller] = lease
            for name in [n for n, old in self.retired.items() if old.expires < time.time() - RETIRED_S]:
                del self.retired[name]
            try:
                self._save_controllers(self.controllers)
            except StateDiskFull as error:  # a restart may see it again, expired by then, and drop it again
                print(f"hearth agent: {error}", file=sys.stderr, flush=True)
            self.log("end", controller, why=why)

    def expired(self) -> list[str]:
        now = time.time()
        return [c for c, lease in self.controllers.items() if lease.expires < now]

    # -- allocation ------------------------------------------------------------------------------
    def next_cid(self) -> int:
        used = {v.cid for v in self.vms.values()}
        return next(c for c in range(3, 1 << 20) if c not in used)

    def next_address(self, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
        """The lowest free guest address; the subnet's first host is the bridge (the guests' gateway)."""
        used = {ipaddress.IPv4Interface(v.address).ip for v in self.vms.values() if v.address}
        hosts = subnet.hosts()
        next(hosts)  # the gateway
        for ip in hosts:
            if ip not in used:
                return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}")
        raise AgentError(f"subnet {subnet} has no free address left: give the host a bigger subnet")

    # -- writing ---------------------------------------------------------------------------------
    def _save_controllers(self, controllers: dict[str, ControllerLease]) -> None:
        with self._writing("the controllers' leases"):
            write_atomic(self.dir / "controllers.json",
                         json.dumps({name: lease.model_dump() for name, lease in controllers.items()}), 0o600)
        self._recorded = {name: lease.expires for name, lease in controllers.items()}

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write that a full disk refuses becomes `StateDiskFull`, naming the directory and the fix."""
        try:
            yield
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            for temp in self.dir.glob("**/*.tmp"):  # what the failed write began
                temp.unlink(missing_ok=True)
            raise StateDiskFull(f"the agent cannot record {what}: its state directory {self.dir} is full "
                                f"({error.strerror}); free space there (env images: hearth env prune --hosts)") from None

    def log(self, op: str, subject: str, **fields: Any) -> None:
        """An audit line; one a full disk refuses is kept, and written (in order) with the next."""
        self._unwritten.append(json.dumps({"at": time.time(), "op": op, "subject": subject, **fields}) + "\n")
        self.flush_log()

    def flush_log(self) -> None:
        if not self._unwritten:
            return
        data = "".join(self._unwritten).encode()
        try:
            fd = os.open(self.dir / "leases.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError:
                    os.ftruncate(fd, start)  # whole lines or none: the log must replay
                    raise
            finally:
                os.close(fd)
        except OSError as error:
            print(f"hearth agent: {len(self._unwritten)} audit line(s) wait for room in {self.dir}: {error.strerror}",
                  file=sys.stderr, flush=True)
            return
        self._unwritten.clear()
