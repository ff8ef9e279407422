"""What the agent has handed out, on disk, so that a restart neither loses nor double-counts a lease.

One JSON file per VM (`vms/<id>.json`, mode 0600: it holds the guest's config, Ray token included): its
controller, GPUs and their IOMMU-group functions, vsock CID, tap, address, whether `vm.boot` answered.
`controllers.json` holds each controller's lease expiry (wall clock, so it survives a restart). A file is
written, atomically, before the thing it records is made, and removed after the thing is gone.

`leases.log` is an append-only audit trail (JSON lines: lease, release, reap), so anyone can check that
no GPU was ever leased twice. One agent per state directory: it holds `agent.lock` while it runs.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from provisioner.errors import AgentError, LeaseConflict
from provisioner.files import write_atomic

RECORD_S = 1.0  # a lease renewal that moves its end by less is not written to disk (see Ledger.renew)


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

    @property
    def devices(self) -> list[str]:
        return [*self.gpus, *self.functions]


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
        self.controllers: dict[str, float] = json.loads(controllers.read_text()) if controllers.exists() else {}
        self._recorded = dict(self.controllers)  # what controllers.json says

    def close(self) -> None:
        os.close(self._lock)

    # -- leases ----------------------------------------------------------------------------------
    def holder(self, device: str) -> str | None:
        return next((v.id for v in self.vms.values() if device in v.devices), None)

    def reserve(self, lease: VmLease) -> None:
        """Record a new VM's lease, or `LeaseConflict` naming who holds what it wants."""
        taken = {d: self.holder(d) for d in lease.devices if self.holder(d) not in (None, lease.id)}
        if taken:
            raise LeaseConflict("GPU " + ", ".join(f"{d} is leased to VM {v}" for d, v in taken.items())
                                + ": place the node on free GPUs (GET /v1/gpus)")
        self.vms[lease.id] = lease
        self.save(lease)
        self._log("lease", lease.id, controller=lease.controller, devices=lease.devices)

    def save(self, lease: VmLease) -> None:
        write_atomic(self.dir / "vms" / f"{lease.id}.json", lease.model_dump_json(), 0o600)

    def release(self, vm_id: str, why: str) -> None:
        lease = self.vms.pop(vm_id, None)
        if lease is not None:
            (self.dir / "vms" / f"{vm_id}.json").unlink(missing_ok=True)
            self._log("release", vm_id, devices=lease.devices, why=why)

    # -- controllers -----------------------------------------------------------------------------
    def renew(self, controller: str, ttl: float) -> float:
        """The controller's lease now ends `ttl` from now. Written to disk (for a restarted agent) unless that
        moves it by less than RECORD_S: every VM a controller creates renews its lease, and a file write per VM,
        in the agent's one thread, held up every boot of a large cluster."""
        expires = self.controllers[controller] = time.time() + ttl
        if abs(expires - self._recorded.get(controller, 0.0)) >= RECORD_S:
            self._save_controllers()
        return expires

    def drop(self, controller: str, why: str) -> None:
        if self.controllers.pop(controller, None) is not None:
            self._save_controllers()
            self._log("end", controller, why=why)

    def expired(self) -> list[str]:
        now = time.time()
        return [c for c, until in self.controllers.items() if until < now]

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

    def _save_controllers(self) -> None:
        write_atomic(self.dir / "controllers.json", json.dumps(self.controllers), 0o600)
        self._recorded = dict(self.controllers)

    def _log(self, op: str, subject: str, **fields: Any) -> None:
        with open(self.dir / "leases.log", "a") as log:
            log.write(json.dumps({"at": time.time(), "op": op, "subject": subject, **fields}) + "\n")
