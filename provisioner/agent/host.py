"""The host agent: this host's GPUs, VMs, taps and addresses, leased to controllers that keep renewing.

Creating a VM, in order (bad input fails before anything is leased or made):
    1. check the request (a `NodeSpec`, node.py, with the controller's lease and what is left of the node's
       boot deadline): the caller is that controller (auth.py), whose lease is open; the GPUs exist here, are
       GPUs, sit on vfio-pci in viable groups; the image is here
    2. under one lock: a GPU VM's layout (ch/gpuvm.py: hugepages on the GPUs' NUMA nodes, vCPU pinning,
       apertures for the BARs, memlock; refused with the fix when it could not boot, warned when it falls back);
       allocate CID, tap, address; write the lease (`LeaseConflict` if a GPU is taken); start
       the boot as a task of the agent's own, so that a release or a lapse that comes meanwhile can end it
    3. ChVm.start: tap on the bridge, cloud-hypervisor, vm.create, vm.boot (any failure undoes itself), every
       wait bounded by the node's deadline
    4. record that vm.boot answered; the guest says hello and ready on the guest channel, which ends here
A VM ends one way (`_end`): its boot is cancelled if it is still booting, the VM is stopped, its lease is
released, and its logs go (or are kept, bounded: keptlogs.py). A VMM that outlives SIGKILL is quarantined
instead: its lease (GPUs, tap, address) stays, `GET /v1/gpus` and `GET /v1/info` say why, and the agent frees
them once the VMM has gone (an admin ends it).

Nothing lives forever. Every VM has a controller whose lease must be renewed (at most MAX_TTL_S ahead); a
housekeeping task, which logs and survives any error, ends the VMs of a lease that lapsed or was released,
any lease record whose controller has none, and (the sweep, sweep.py: at start and every SWEEP_INTERVAL)
any VMM, tap or VM directory of this agent that no lease record accounts for.

The VMMs outlive the agent, so a restart keeps the VMs: on start the agent adopts every VM whose VMM still
runs, had booted and whose controller's lease holds, and removes what is left of every other one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provisioner.agent import sweep
from provisioner.agent.auth import Caller, Forbidden, check_controller, new_secret
from provisioner.agent.envstore import DEFAULT_MARGIN, EnvStore, parse_margin
from provisioner.agent.keptlogs import KeptLogs
from provisioner.agent.ledger import MAX_TTL_S, MIN_TTL_S, Ledger, VmLease
from provisioner.ch import gpuvm
from provisioner.ch.config import GpuGroup, vm_spec
from provisioner.ch.vm import ChVm
from provisioner.errors import AgentError, HearthError, LeaseConflict, VmNotFound
from provisioner.events import TERMINAL, NodeEvent, NodeState
from provisioner.net import bridge_facts, delete_tap, guest_mac, ipv4_routes, tap_exists, tap_name
from provisioner.node import ExpectedGpu, GpuRequest, GuestConfig, GuestNetwork, NodeSpec
from provisioner.processes import AdoptedProcess, Child, terminate
from provisioner.vm import tail
from vfio.bars import address_bits, read_bars
from vfio.fabric import fabric_manager
from vfio.hostroot import HostRoot
from vfio.inventory import host_report
from vfio.numa import free_hugepages_1g, numa_nodes
from vfio.pci import VFIO_DRIVER, PciTopology

VERSION = "0.1.0"
REAP_INTERVAL = 1.0
KEEP_ENDED_S = 600.0  # how long an ended VM's record stays readable (a controller may ask how it ended)
MAX_BUDGET_S = 86400.0


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host_root: Path = Path("/")
    state_dir: Path = Path("/var/lib/hearth/agent")
    run_dir: Path = Path("/run/hearth/vms")  # per-VM sockets and logs: short, a socket path fits 107 bytes
    cloud_hypervisor: str = "cloud-hypervisor"
    bridge: str | None = None
    subnet: ipaddress.IPv4Network | None = None
    reconnect_s: float = 30.0  # how long a guest waits for a restarting agent before it powers off
    # Settings for cloud-hypervisor-standin (`HEARTH_STANDIN` in the agent's environment): applied to every VM
    # that does not bring its own; only with the stand-in as the VMM.
    standin: dict[str, Any] | None = None
    env_margin: str = DEFAULT_MARGIN  # free disk an env image upload must leave (HEARTH_AGENT_ENV_MARGIN)
    # GPU VMs' memory from 1 GiB hugepages: when free on the GPUs' NUMA nodes ("auto", else 4 KiB pages with a
    # warning), always ("require": refused without them), never ("off").
    hugepages: Literal["auto", "require", "off"] = "auto"

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network | None:
        if value is not None and value.num_addresses < 4:
            raise ValueError("a host subnet needs room for a gateway and guests: /30 or bigger")
        return value

    @field_validator("env_margin")
    @classmethod
    def _margin(cls, value: str) -> str:
        parse_margin(value)  # a bad setting stops the agent before it starts
        return value

    @model_validator(mode="after")
    def _standin(self) -> AgentConfig:
        if self.standin is not None and not _is_standin(self.cloud_hypervisor):
            raise ValueError("HEARTH_STANDIN is set, but the VMM is not cloud-hypervisor-standin: unset it, or "
                             "pass --cloud-hypervisor cloud-hypervisor-standin to try hearth without a real VMM")
        return self


class CreateVm(BaseModel):
    """PUT /v1/vms/{id}: the node, the controller whose lease keeps it, and what is left of its boot deadline."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    controller: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    lease_s: float = Field(default=30.0, ge=MIN_TTL_S, le=MAX_TTL_S)
    budget_s: float = Field(default=300.0, gt=0, le=MAX_BUDGET_S)  # seconds left of the node's boot_timeout
    node: NodeSpec
    standin: dict[str, Any] | None = None  # settings for cloud-hypervisor-standin; refused by a real VMM


def preflight(config: AgentConfig) -> None:
    """What must hold before the agent makes anything: its bridge exists (with a subnet to hand out), and its
    state and run directories, if they exist, are only its own to write (it runs as root, and writes
    leases, sockets and logs there: a directory another user can write would let them plant a symlink)."""
    if config.bridge and config.subnet is None:
        raise AgentError("--bridge needs --subnet: the agent hands guests addresses from the host's subnet")
    if config.bridge and not bridge_facts(config.bridge)["exists"]:
        raise AgentError(f"bridge {config.bridge} does not exist: create it (the hearth_network Ansible "
                         "role does, see docs/networking.md) or start the agent without --bridge")
    for what, directory in (("--state-dir", config.state_dir), ("--run-dir", config.run_dir)):
        try:
            facts = os.lstat(directory)
        except FileNotFoundError:
            continue  # made 0700 by the agent
        if stat.S_ISLNK(facts.st_mode) or not stat.S_ISDIR(facts.st_mode):
            raise AgentError(f"{what} {directory} is not a directory (a symlink?): give the agent a directory "
                             "of its own")
        if facts.st_uid != os.geteuid() or facts.st_mode & 0o022:
            raise AgentError(f"{what} {directory} is owned by uid {facts.st_uid} with mode "
                             f"{stat.S_IMODE(facts.st_mode):04o}: the agent runs as uid {os.geteuid()} and keeps "
                             "leases, sockets and logs there, so only it may write there; remove the directory "
                             "(the agent makes it, mode 0700) or chown/chmod it")


class HostAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = HostRoot(config.host_root)
        self.ledger = Ledger(config.state_dir)
        self.envs = EnvStore(config.state_dir / "envs", config.env_margin)
        self.kept = KeptLogs(config.state_dir / "ended")
        self.vms: dict[str, ChVm] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()  # lease records and VM creation: what a release collects is all there is
        self._changes: dict[str, asyncio.Event] = {}  # per VM: set (and replaced) on each of its events
        self._closing = False  # the agent is stopping: long polls answer at once
        self._booting: dict[str, asyncio.Task] = {}  # VM id -> its boot, until vm.boot answered or it failed
        self._ending: dict[str, asyncio.Task] = {}  # VM id -> its end, while it runs (`_end`)
        self._how_ending: dict[str, tuple[str, bool]] = {}  # VM id -> (why, keep its logs)
        self._stuck: dict[str, Child] = {}  # quarantined VMs' VMMs, watched until they have gone
        self._tasks: set[asyncio.Task] = set()
        self._housekeeper: asyncio.Task | None = None
        self._swept_at = 0.0
        self._promised: dict[str, list[tuple[int | None, int]]] = {}  # 1 GiB pages per NUMA node, by VM booting

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            preflight(self.config)
        except AgentError:
            self.ledger.close()
            raise
        self.config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._recover()
        await self._sweep()
        self._housekeeper = asyncio.create_task(self._housekeeping())

    def end_watches(self) -> None:
        """The agent is stopping: every long poll (a controller following a VM, up to a minute) answers now with
        the VM as it is, so that the server's shutdown does not wait them out while leases run down."""
        self._closing = True
        for changed in self._changes.values():
            changed.set()
        self._changes.clear()

    async def close(self) -> None:
        """Stop serving; the VMs keep running (a restarted agent adopts them)."""
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for vm in self.vms.values():
            await vm.detach()
        self.ledger.close()

    # -- inventory -------------------------------------------------------------------------------
    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU a VM could take (on vfio-pci, viable group), who leases it, and why it is kept if its VM's
        VMM outlived SIGKILL (quarantined)."""
        topology = PciTopology(self.host)
        found = []
        for gpu in topology.gpus:
            if gpu.driver == VFIO_DRIVER and topology.group_viable(gpu):
                holder = self.ledger.holder(gpu.address)
                lease = self.ledger.vms.get(holder) if holder else None
                found.append({"address": gpu.address, "numa": gpu.numa_node,
                              "functions": [c.address for c in topology.companions(gpu)],
                              "leased_to": holder, "quarantined": lease.quarantined if lease else None})
        return found

    def info(self, image: Path | None = None) -> dict[str, Any]:
        gpus = self.gpus()
        report = host_report(self.host)
        info = {
            "agent": VERSION, "hostname": socket.gethostname(),
            "cloud_hypervisor": _vmm_version(self.config.cloud_hypervisor),
            "vfio": {"exit_code": report.exit_code, "gpus": len(report.gpus),
                     "problems": [f.message for f in report.problems][:5]},
            "gpus": {"usable": len(gpus), "free": sum(1 for g in gpus if g["leased_to"] is None),
                     "models": self._gpu_models()},
            "nvswitches": self._nvswitches(),
            "vms": len(self.vms), "controllers": len(self.ledger.controllers),
            "quarantined": self.quarantined(),
            "network": self._network(),
        }
        if image is not None:
            info["image_problem"] = _image_problem(image)
        return info

    def quarantined(self) -> list[dict[str, Any]]:
        """The VMs whose VMM outlived SIGKILL, and what they keep from other VMs until it has gone."""
        return [{"vm": lease.id, "controller": lease.controller, "pid": self._stuck_pid(lease.id),
                 "gpus": lease.devices, "tap": lease.tap, "address": lease.address, "why": lease.quarantined}
                for lease in self.ledger.vms.values() if lease.quarantined]

    def _gpu_models(self) -> dict[str, dict[str, Any]]:
        """Every NVIDIA GPU here, by PCI device id ("10de:2330": {"name", "count"}): what the image's driver must
        support (`hearth hosts check` compares)."""
        models: dict[str, dict[str, Any]] = {}
        for gpu in PciTopology(self.host).gpus:
            models.setdefault(gpu.ids, {"name": gpu.name, "count": 0})["count"] += 1
        return models

    def _nvswitches(self) -> dict[str, Any]:
        """The host's NVSwitches (they stay with the host: VMs get GPUs only) and its Fabric Manager."""
        switches = PciTopology(self.host).nvswitches
        if not switches:
            return {"count": 0}
        fabric = fabric_manager(self.host)
        return {"count": len(switches), "drivers": sorted({s.driver or "none" for s in switches}),
                "fabric_manager": fabric.model_dump(), "shared_nvswitch": fabric.shared_nvswitch,
                "summary": _nvswitch_text(len(switches), fabric)}

    def _network(self) -> dict[str, Any]:
        forwarding = self.host.path("proc/sys/net/ipv4/ip_forward")
        return {"bridge": bridge_facts(self.config.bridge) if self.config.bridge else None,
                "subnet": str(self.config.subnet) if self.config.subnet else None,
                "forwarding": forwarding.is_file() and forwarding.read_text().strip() == "1",
                "routes": ipv4_routes()}

    # -- controllers' leases -----------------------------------------------------------------------
    async def lease(self, controller: str, ttl: float, caller: Caller) -> dict[str, Any]:
        """Open `controller`'s lease (answering its secret, this once) or renew it (its own caller, or root)."""
        check_controller(controller)
        async with self._lock:
            held = self.ledger.controllers.get(controller)
            if held is None or held.secret_sha256 is None:  # new, or from before identities: claimed now
                if caller.uid is None:
                    raise Forbidden("the agent cannot tell who calls (no peer credentials on its socket)")
                secret, digest = new_secret()
                expires = self.ledger.open(controller, ttl, caller.uid, digest)
                opened = {"secret": secret}
            else:
                caller.may_act_for(controller)
                expires = self.ledger.renew(controller, ttl)
                opened = {}
        return {"controller": controller, "expires_in": round(expires - time.time(), 3),
                "vms": sorted(v.id for v in self.ledger.vms.values() if v.controller == controller), **opened}

    async def release(self, controller: str, why: str = "its controller released it", grace: float = 5.0, *,
                      caller: Caller | None = None, only_if_expired: bool = False, keep_logs: bool = False) -> None:
        """Forget `controller`'s lease, then end every VM it has (each with `grace` seconds to power off), those
        still booting included. Once the lease is gone no VM can be created for it, so none is missed."""
        check_controller(controller)
        if caller is not None:
            caller.may_act_for(controller)
        async with self._lock:
            if only_if_expired and controller not in self.ledger.expired():
                return  # renewed meanwhile
            self.ledger.drop(controller, why)
            mine = [v.id for v in self.ledger.vms.values() if v.controller == controller and not v.quarantined]
        await asyncio.gather(*(self._end(v, why, grace, keep_logs=keep_logs) for v in mine), return_exceptions=True)
        if not keep_logs:
            for vm_id in [v for v, summary in self.ended.items() if summary.get("controller") == controller]:
                self.kept.forget(vm_id)

    # -- VMs -------------------------------------------------------------------------------------
    async def create_vm(self, vm_id: str, request: CreateVm, caller: Caller) -> dict[str, Any]:
        """Lease, start and boot; returns once vm.boot answered, within the request's budget. The same request
        again (a controller retrying after a dropped connection) gets the same VM: the boot is the agent's
        task, not the request's, so a dropped connection does not end it."""
        caller.may_act_for(request.controller)
        deadline = time.monotonic() + request.budget_s
        if vm_id != request.node.id:
            raise AgentError(f"the VM id in the path ({vm_id}) is not the node's id ({request.node.id})")
        async with self._lock:
            lease = self.ledger.vms.get(vm_id)
            if lease is not None:
                if (lease.controller, _uid(lease)) != (request.controller, request.node.uid):
                    raise LeaseConflict(f"VM id {vm_id} is taken (controller {lease.controller}); stop that VM first")
            else:
                held = self.ledger.controllers.get(request.controller)
                by_hand = held is None and caller.admin  # root, by hand: its lease is opened for it, below
                if not by_hand and (held is None or held.expires < time.time()):
                    raise LeaseConflict(f"controller {request.controller} has no lease on this host (it lapsed or was "
                                        f"released): open one (POST /v1/leases/{request.controller}) before creating VMs")
                if request.standin is not None and not _is_standin(self.config.cloud_hypervisor):
                    raise AgentError("standin settings are for cloud-hypervisor-standin; this agent runs a real VMM")
                gpus = self._check_gpus(request.node.gpus)
                self._env_disk(request.node)
                cid = self.ledger.next_cid()
                address = self.ledger.next_address(self.config.subnet) if self.config.bridge else None
                lease = VmLease(id=vm_id, controller=request.controller, cid=cid,
                                gpus=[g.address for g in gpus], functions=[f for g in gpus for f in g.functions],
                                tap=tap_name(address.ip) if address else None,
                                address=str(address) if address else None,
                                mac=guest_mac(address.ip) if address else None,
                                created_at=time.time(), request=request.model_dump(mode="json"))
                vm = self._vm(lease, gpus)  # checks the spec and the host's fit: nothing is leased yet if it is bad
                self.ledger.reserve(lease)
                if vm.spec.layout is not None and vm.spec.layout.hugepages:
                    self._promised[vm_id] = vm.spec.layout.hugepages  # taken from sysfs's free count once it booted
                if by_hand:
                    self.ledger.open(request.controller, request.lease_s, 0, new_secret()[1])  # its secret unused
                self.ledger.renew(request.controller, request.lease_s)
                self.vms[vm_id] = vm
                self._booting[vm_id] = asyncio.create_task(self._boot(vm, lease, deadline))
            boot = self._booting.get(vm_id)
        if boot is not None:
            try:
                await asyncio.shield(boot)
            except asyncio.CancelledError:
                if not boot.cancelled():
                    raise  # this request was cancelled, not the boot
                raise LeaseConflict(f"VM {vm_id} was ended while it booted: its controller's lease was released "
                                    "or lapsed, or it was deleted") from None
        return self.vm(vm_id)

    async def _boot(self, vm: ChVm, lease: VmLease, deadline: float) -> None:
        try:
            await vm.start(deadline)
        except BaseException as error:
            self._settle(lease.id, f"its boot failed: {_first_line(error)}")
            raise
        finally:
            self._booting.pop(lease.id, None)
            self._promised.pop(lease.id, None)
        lease.booted = True
        try:
            self.ledger.save(lease)
        except AgentError as error:  # it runs; a restart before this is written removes it, and its controller retries
            _say(f"VM {lease.id} booted, but: {error}")

    def vm(self, vm_id: str) -> dict[str, Any]:
        if vm_id in self.vms:
            return _summary(self.vms[vm_id], self.ledger.vms.get(vm_id))
        if vm_id in self.ended:
            return self.ended[vm_id]
        raise VmNotFound(f"no VM {vm_id} on this host")

    def owner(self, vm_id: str) -> str | None:
        """The controller a VM (running or ended) belongs to; VmNotFound for one this agent does not know."""
        lease = self.ledger.vms.get(vm_id)
        return lease.controller if lease is not None else self.vm(vm_id)["controller"]

    def envs_in_use(self) -> set[str]:
        """The env images the VMs here use (each names its own in its request)."""
        return {env["sha256"] for lease in self.ledger.vms.values()
                if (env := lease.request.get("node", {}).get("env_image"))}

    def _env_disk(self, node: NodeSpec) -> Path | None:
        """The env image a node runs from, as this host keeps it; refused when it has not arrived whole."""
        if node.env_image is None:
            return None
        if not self.envs.path(node.env_image.sha256).is_file():
            raise AgentError(f"env image {node.env_image.sha256[:12]} is not on this host: the controller sends it "
                             "before it creates VMs (PUT /v1/envs/{sha256}), and this one did not")
        return self.envs.path(node.env_image.sha256)

    def logs(self, vm_id: str, caller: Caller) -> dict[str, str]:
        """A VM's serial console (kernel, initramfs, guest agent) and its VMM's log, each size-bounded; an ended
        VM's as they were kept (keptlogs.py)."""
        caller.may_act_for(self.owner(vm_id))
        if vm_id not in self.vms:
            kept = self.kept.read(vm_id) or {}
            return {"serial": kept.get("serial.log", ""), "vmm": kept.get(f"{ChVm.vmm}.log", "")}
        directory = self.config.run_dir / vm_id
        return {"serial": tail(directory / "serial.log"), "vmm": tail(directory / f"{ChVm.vmm}.log")}

    def list_vms(self, caller: Caller) -> list[dict[str, Any]]:
        """Root sees every VM; a controller its own."""
        if not caller.admin:
            if caller.controller is None:
                caller.may_act_for(None)  # says what is missing
            return [self.vm(v) for v, lease in self.ledger.vms.items() if lease.controller == caller.controller
                    and v in self.vms]
        return [self.vm(v) for v in self.vms]

    async def watch(self, vm_id: str, after: int, wait: float, uid: str | None, caller: Caller,
                    until: NodeState | None = None) -> dict[str, Any]:
        """The VM once it has more than `after` events (or has ended), or as it is after `wait` seconds.
        With `until`, not before it has reached that state (or failed, stopped or ended): a controller follows
        a boot with one request instead of one per event. With `uid`, only that incarnation of the VM id: an
        earlier one is `NotFound`. Only this VM's own events wake the request."""
        caller.may_act_for(self.owner(vm_id))
        deadline = time.monotonic() + wait
        while True:
            vm = self.vms.get(vm_id)
            if vm is None or not self._waiting(vm, after, until):
                summary = self.vm(vm_id)
                if uid is not None and summary["uid"] != uid:
                    raise VmNotFound(f"VM {vm_id} is not (or no longer) the one with uid {uid}")
                return summary
            if uid is not None and _uid(self.ledger.vms.get(vm_id)) != uid:
                raise VmNotFound(f"VM {vm_id} is not (or no longer) the one with uid {uid}")
            if time.monotonic() >= deadline or self._closing:
                return self.vm(vm_id)
            changed = self._changes.setdefault(vm_id, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())

    @staticmethod
    def _waiting(vm: ChVm, after: int, until: NodeState | None) -> bool:
        """Whether a watch of `vm` has nothing to answer yet."""
        events = vm.history.events
        if until is None:
            return len(events) <= after
        return not (vm.tracker.reached(until) or vm.history.state in TERMINAL)

    async def delete_vm(self, vm_id: str, grace: float, caller: Caller) -> dict[str, Any]:
        caller.may_act_for(self.owner(vm_id))
        if vm_id in self.ledger.vms or vm_id in self.vms:
            await self._end(vm_id, "deleted by its controller", grace, keep_logs=False)
        return self.vm(vm_id)

    # -- a VM's end ------------------------------------------------------------------------------
    def _end(self, vm_id: str, why: str, grace: float, *, keep_logs: bool = True) -> asyncio.Future:
        """End a VM, one way whoever asks (its controller, a release, the reaper, the sweep): cancel its boot if
        it is booting, stop it, release its lease, or quarantine it if its VMM outlives SIGKILL. Asked again
        while it runs, the same ending is awaited."""
        task = self._ending.get(vm_id)
        if task is None:
            self._how_ending[vm_id] = (why, keep_logs)
            task = self._ending[vm_id] = asyncio.create_task(self._ending_vm(vm_id, why, grace, keep_logs))
            task.add_done_callback(lambda _: (self._ending.pop(vm_id, None), self._how_ending.pop(vm_id, None)))
        return asyncio.shield(task)

    async def _ending_vm(self, vm_id: str, why: str, grace: float, keep_logs: bool) -> None:
        boot = self._booting.get(vm_id)
        if boot is not None:
            boot.cancel()  # the boot stops what it started, then settles
            await asyncio.gather(boot, return_exceptions=True)
        vm = self.vms.get(vm_id)
        if vm is not None:
            await vm.stop(grace)
        self._settle(vm_id, why, keep_logs)

    def _settle(self, vm_id: str, why: str, keep_logs: bool = True) -> None:
        """After a stop: release the VM's lease, or quarantine it when its VMM outlived SIGKILL."""
        vm = self.vms.get(vm_id)
        if vm is not None and vm.stuck:
            self._quarantine(vm_id, vm.process)
        else:
            self._forget(vm_id, why, keep_logs)

    def _quarantine(self, vm_id: str, process: Child | None) -> None:
        lease = self.ledger.vms.get(vm_id)
        if lease is None:
            return
        pid = process.pid if process is not None else None
        why = (f"its VMM (pid {pid}) outlived SIGKILL at {time.strftime('%Y-%m-%d %H:%M:%S')}: its GPUs, tap and "
               "address stay leased until it has gone (find what holds it, e.g. a VFIO reset in the kernel, and end "
               "it; the agent frees them then)")
        self.ledger.quarantine(vm_id, lease.quarantined or why)
        if process is not None:
            self._stuck[vm_id] = process
        _say(f"VM {vm_id} quarantined: {why}")

    def _stuck_pid(self, vm_id: str) -> int | None:
        process = self._stuck.get(vm_id)
        return process.pid if process is not None else None

    def _on_event(self, event: NodeEvent) -> None:
        if event.state == NodeState.stopped and event.node in self.vms:
            why, keep_logs = self._how_ending.get(event.node, (event.detail or "stopped", True))
            self._forget(event.node, why, keep_logs)
        changed = self._changes.pop(event.node, None)
        if changed is not None:
            changed.set()

    def _forget(self, vm_id: str, why: str, keep_logs: bool = True) -> None:
        vm = self.vms.pop(vm_id, None)
        if vm is not None:
            self.ended[vm_id] = _summary(vm, self.ledger.vms.get(vm_id))
            logs = {"serial.log": vm.serial_log, f"{ChVm.vmm}.log": vm.vmm_log}
            if keep_logs:
                self.kept.keep(vm_id, logs)
            else:
                for path in logs.values():
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                vm.dir.rmdir()
        self._stuck.pop(vm_id, None)
        self.ledger.release(vm_id, why)
        cutoff = time.time() - KEEP_ENDED_S
        for old in [k for k, v in self.ended.items() if (v["events"] or [{"at": 0}])[-1]["at"] < cutoff]:
            del self.ended[old]

    # -- housekeeping ----------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Every REAP_INTERVAL: end what lapsed or lost its lease, free what a stuck VMM held once it has gone,
        and sweep. An error is logged and the next round runs: this task must not die."""
        while True:
            try:
                await self._tend()
            except Exception:  # noqa: BLE001
                _say("housekeeping failed (it runs again in a second):\n" + traceback.format_exc())
            await asyncio.sleep(REAP_INTERVAL)

    async def _tend(self) -> None:
        self.ledger.flush_log()
        for controller in self.ledger.expired():  # the notebook died, the network split: nobody is waiting
            self._spawn(self.release(controller, "its controller's lease expired", grace=0, only_if_expired=True,
                                     keep_logs=True))
        for vm_id, lease in list(self.ledger.vms.items()):
            if lease.quarantined:
                await self._free_if_gone(vm_id)
            elif lease.controller not in self.ledger.controllers and vm_id not in self._ending:
                self._spawn(self._end(vm_id, f"its controller {lease.controller} has no lease here", 0))
        if time.monotonic() - self._swept_at >= sweep.SWEEP_INTERVAL:
            await self._sweep()

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def _free_if_gone(self, vm_id: str) -> None:
        """A quarantined VM: once its VMM has gone at last, remove what it made and release its lease."""
        process = self._stuck.get(vm_id)
        if process is None:  # quarantined before a restart: find it again by its command line
            pid = sweep.vmm_processes(self.config.run_dir).get(vm_id)
            process = AdoptedProcess.adopt(pid, sweep.is_vmm_of(self.config.run_dir, vm_id)) if pid else None
            if process is not None:
                self._stuck[vm_id] = process
                return
        elif process.returncode is None:
            return
        vm = self.vms.get(vm_id)
        self._how_ending[vm_id] = ("its stuck VMM has gone at last", True)
        try:
            if vm is not None:
                await vm.stop(0)  # it has exited: this removes its sockets and tap, and the lease goes
            lease = self.ledger.vms.get(vm_id)
            if lease is not None:
                self._remove_remains(lease)
                self._forget(vm_id, "its stuck VMM has gone at last")
        finally:
            self._how_ending.pop(vm_id, None)

    async def _sweep(self) -> None:
        """End every VMM, tap and VM directory of this agent that no lease record accounts for (sweep.py)."""
        self._swept_at = time.monotonic()
        run_dir = self.config.run_dir
        leased = set(self.ledger.vms) | set(self.vms)
        for vm_id, pid in sweep.vmm_processes(run_dir).items():
            if vm_id in leased:
                continue
            process = AdoptedProcess.adopt(pid, sweep.is_vmm_of(run_dir, vm_id))
            if process is None:
                continue
            ended = await terminate(process, 0)
            process.close()
            self.ledger.log("sweep", vm_id, what=f"VMM pid {pid}", ended=ended)
            held = self.ledger.held_by(vm_id)
            if held and ended:  # the audit log still had it leased: it is free now, and the log says so
                self.ledger.log("release", vm_id, devices=held, why="swept: its VMM ran with no lease record")
            _say(f"swept VM {vm_id}'s VMM (pid {pid}), which no lease accounted for" + ("" if ended else ": it outlived SIGKILL"))
        taps = {lease.tap for lease in self.ledger.vms.values() if lease.tap}
        for tap in sweep.taps_on(self.config.bridge):
            if tap not in taps and tap not in {lease.tap for lease in self.ledger.vms.values()}:
                delete_tap(tap)
                self.ledger.log("sweep", tap, what="tap")
                _say(f"swept tap {tap}, which no lease accounted for")
        leased = set(self.ledger.vms) | set(self.vms)
        for name in sweep.vm_dirs(run_dir):
            if name not in leased and name not in sweep.vmm_processes(run_dir):
                shutil.rmtree(run_dir / name, ignore_errors=True)
                self.ledger.log("sweep", name, what="VM directory")
                held = self.ledger.held_by(name)
                if held:  # its VMM ended while no agent ran, and its record is lost: the log still says it is free
                    self.ledger.log("release", name, devices=held, why="swept: its VM ended with no lease record")

    async def _recover(self) -> None:
        """After a restart: adopt every recorded VM whose VMM runs, had booted and whose controller's lease holds;
        remove what is left of every other one (a quarantined one stays quarantined while its VMM runs)."""
        expired = set(self.ledger.expired())
        running = sweep.vmm_processes(self.config.run_dir)
        for lease in list(self.ledger.vms.values()):
            pid = running.get(lease.id)
            process = AdoptedProcess.adopt(pid, sweep.is_vmm_of(self.config.run_dir, lease.id)) if pid else None
            if lease.quarantined:
                if process is not None:
                    self._stuck[lease.id] = process
                continue  # housekeeping frees it once it has gone
            if process is not None and lease.booted and lease.controller in self.ledger.controllers \
                    and lease.controller not in expired:
                try:
                    vm = self._vm(lease)
                    vm.tracker.transition(NodeState.requested, "adopted by a restarted agent")
                    vm.tracker.transition(NodeState.placed)
                    vm.tracker.transition(NodeState.vmm_started)
                    vm.tracker.transition(NodeState.booting)
                    self.vms[lease.id] = vm
                    await vm.adopt(process, made_tap=lease.tap is not None)
                    continue
                except (HearthError, OSError) as error:
                    self.vms.pop(lease.id, None)
                    why = f"could not adopt it: {error}"
            else:
                why = ("its VMM was gone" if process is None else "it had not booted when the agent stopped"
                       if not lease.booted else "its controller's lease had expired")
            if process is not None and not await terminate(process, 0):
                self._quarantine(lease.id, process)
                continue
            if process is not None:
                process.close()
            self._remove_remains(lease)
            self.ledger.release(lease.id, f"agent restart: {why}")
        for controller in expired:
            self.ledger.drop(controller, "its controller's lease expired")

    def _remove_remains(self, lease: VmLease) -> None:
        """What a VM that has no VMM any more made: its tap and its directory (its logs kept, bounded)."""
        if lease.tap and tap_exists(lease.tap):
            delete_tap(lease.tap)
        directory = self.config.run_dir / lease.id
        self.kept.keep(lease.id, {"serial.log": directory / "serial.log",
                                  f"{ChVm.vmm}.log": directory / f"{ChVm.vmm}.log"})
        shutil.rmtree(directory, ignore_errors=True)

    # -- inside ----------------------------------------------------------------------------------
    def _check_gpus(self, wanted: list[GpuRequest]) -> list[GpuGroup]:
        topology = PciTopology(self.host)
        groups, problems = [], []
        for gpu in wanted:
            device = topology.devices.get(gpu.address)
            if device is None or not device.is_gpu:
                problems.append(f"{gpu.address} is not a GPU on this host")
            elif device.driver != VFIO_DRIVER:
                problems.append(f"{gpu.address} is on {device.driver or 'no driver'}, not vfio-pci "
                                f"(hearth vfio bind {gpu.address} --persist)")
            elif not topology.group_viable(device):
                problems.append(f"{gpu.address}'s IOMMU group is not viable (hearth vfio check says why)")
            else:
                groups.append(GpuGroup(address=gpu.address, clique=gpu.clique,
                                       functions=[c.address for c in topology.companions(device)]))
        if problems:
            raise AgentError("; ".join(problems))
        return groups

    def _vm(self, lease: VmLease, gpus: list[GpuGroup] | None = None) -> ChVm:
        """The VM of a lease: a new one (`gpus` checked by the caller: its layout is decided now, and may be
        refused), or one a restarted agent adopts (running already: no layout to decide)."""
        request = CreateVm.model_validate(lease.request)
        node, image = request.node, request.node.image
        new = gpus is not None
        gpus = self._check_gpus(node.gpus) if gpus is None else gpus
        topology = PciTopology(self.host)
        spec = vm_spec(node_id=lease.id, kernel=image / "vmlinuz",
                       initramfs=image / "initrd.img" if (image / "initrd.img").is_file() else None,
                       image=image / "rootfs.img", cpus=node.cpus, memory_mib=node.memory_mib,
                       vsock_cid=lease.cid, tap=lease.tap, mac=lease.mac, sysfs_root=self.config.host_root,
                       env_disk=self._env_disk(node), gpus=gpus,
                       layout=self._layout(lease.id, node, gpus, topology) if new and gpus else None)
        network = None
        if lease.address:
            network = GuestNetwork(address=lease.address, gateway=str(next(self.config.subnet.hosts())), mac=lease.mac)
        expected = [ExpectedGpu(address=g.address, device=topology.devices[g.address].ids) for g in gpus]
        guest = GuestConfig.for_node(node, network=network, reconnect_s=self.config.reconnect_s, gpus=expected)
        standin = request.standin if request.standin is not None else self.config.standin
        env = {"HEARTH_STANDIN": json.dumps(standin)} if standin is not None else None
        return ChVm(spec, self.config.run_dir, guest, binary=self.config.cloud_hypervisor, on_event=self._on_event,
                    env=env, create_tap=lease.tap is not None, bridge=self.config.bridge, tied_to_parent=False)

    def _layout(self, vm_id: str, node: NodeSpec, gpus: list[GpuGroup], topology: PciTopology) -> gpuvm.GpuLayout:
        """The GPU VM's layout from this host's facts now (AgentError with the fix when it could not boot), with
        what becomes of the NVSwitches."""
        addresses = [g.address for g in gpus]
        facts = gpuvm.HostFacts(
            gpus={g.address: gpuvm.GpuFacts(
                address=g.address, device=topology.devices[g.address].ids, name=topology.devices[g.address].name,
                numa=topology.devices[g.address].numa_node,
                bars={a: read_bars(self.host, a) for a in [g.address, *g.functions]}) for g in gpus},
            nodes=numa_nodes(self.host), free_hugepages=free_hugepages_1g(self.host),
            address_bits=address_bits(self.host), memlock=gpuvm.memlock())
        promised: dict[int | None, int] = {}
        for pages in self._promised.values():
            for numa, count in pages:
                promised[numa] = promised.get(numa, 0) + count
        layout = gpuvm.plan(node=vm_id, memory_mib=node.memory_mib, cpus=node.cpus, gpus=addresses, facts=facts,
                            hugepages=self.config.hugepages, promised=promised)
        if not topology.nvswitches:
            return layout
        fabric = fabric_manager(self.host)
        notes, warnings = [*layout.notes, _nvswitch_text(len(topology.nvswitches), fabric)], list(layout.warnings)
        if len(gpus) > 1 and not fabric.shared_nvswitch:
            warnings.append(
                f"NVLink between this node's {len(gpus)} GPUs runs through the host's NVSwitches, which need Fabric "
                "Manager running on the host in shared NVSwitch mode with a partition of exactly these GPUs active; "
                "without it CUDA in the guest fails with error 802 (system not yet initialized). Fix: install "
                "nvidia-fabricmanager of the host driver's version, FABRIC_MODE=1 in "
                "/usr/share/nvidia/nvswitch/fabricmanager.cfg, systemctl enable --now nvidia-fabricmanager, and "
                "activate the partition of these GPUs (fmpm)")
        elif len(gpus) > 1:
            notes.append("the partition of exactly these GPUs must be active (hearth does not activate partitions)")
        return layout.model_copy(update={"notes": notes, "warnings": warnings})


def _summary(vm: ChVm, lease: VmLease | None) -> dict[str, Any]:
    history = vm.history
    return {"id": vm.spec.node_id, "uid": _uid(lease) if lease else "",
            "state": history.state.value if history.state else "new",
            "controller": lease.controller if lease else None, "gpus": lease.gpus if lease else [],
            "address": lease.address if lease else None, "tap": lease.tap if lease else None,
            "pid": vm.process.pid if vm.process else None, "profile": history.profile(),
            "quarantined": lease.quarantined if lease else None,
            "guest_profile": vm.guest_profile,
            "guest_gpus": vm.link.gpus, "layout": vm.spec.layout.model_dump(mode="json") if vm.spec.layout else None,
            "heard_s_ago": round(time.monotonic() - vm.channel.last_heard, 1) if vm.channel and vm.channel.last_heard else None,
            "events": [{"state": e.state.value, "at": e.at, "detail": e.detail} for e in history.events]}


def _nvswitch_text(count: int, fabric) -> str:
    mode = ("shared NVSwitch mode: NVLink partitions are Fabric Manager's to activate" if fabric.shared_nvswitch
            else "NVLink between a VM's GPUs needs it running with FABRIC_MODE=1")
    return f"NVSwitches: {count} stay with the host (VMs get GPUs only); {fabric.describe()} ({mode})"


def _uid(lease: VmLease | None) -> str:
    if lease is None:
        return ""
    return lease.request.get("node", {}).get("uid", "")


def _is_standin(binary: str) -> bool:
    return Path(binary).name.endswith("-standin")


def _say(message: str) -> None:
    print(f"hearth agent: {message}", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled (its lease was released, or it was deleted)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        _say("".join(traceback.format_exception(type(error), error, error.__traceback__)))


def _vmm_version(binary: str) -> dict[str, Any]:
    found = shutil.which(binary)
    if found is None:
        return {"binary": binary, "version": None, "problem": f"{binary} not found (the Ansible role installs it)"}
    return _version_of(found, os.stat(found).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _version_of(found: str, mtime_ns: int) -> dict[str, Any]:
    """Asked once per binary (and again when it is replaced): `--version` costs a process start."""
    try:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"binary": found, "version": None, "problem": str(error)}
    return {"binary": found, "version": out.split()[1] if len(out.split()) > 1 else out, "standin": "stand-in" in out}


def _image_problem(image: Path) -> str | None:
    missing = [f for f in ("vmlinuz", "rootfs.img") if not (image / f).is_file()]
    if missing:
        return f"image {image} lacks {', '.join(missing)} on this host; build it with `hearth guest build` and copy it here"
    return None
