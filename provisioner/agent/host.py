"""The host agent: this host's GPUs, VMs, taps and addresses, leased to controllers that keep renewing.

Creating a VM, in order (bad input fails before anything is leased or made):
    1. check the request (a `NodeSpec`, node.py, with the controller's lease and what is left of the node's
       boot deadline): the GPUs exist here, are GPUs, sit on vfio-pci in viable groups; the image is here
    2. under one lock: a GPU VM's layout (ch/gpuvm.py: hugepages on the GPUs' NUMA nodes, vCPU pinning,
       apertures for the BARs, memlock; refused with the fix when it could not boot, warned when it falls back);
       allocate CID, tap, address; write the lease (`LeaseConflict` if a GPU is taken)
    3. ChVm.start: tap on the bridge, cloud-hypervisor, vm.create, vm.boot (any failure undoes itself), every
       wait bounded by the node's deadline
    4. record that vm.boot answered; the guest says hello and ready on the guest channel, which ends here
A VM's end (deleted, its controller's lease expired, the guest powered off, the VMM died) releases its lease.

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
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provisioner.agent.envstore import DEFAULT_MARGIN, EnvStore, parse_margin
from provisioner.agent.ledger import Ledger, VmLease
from provisioner.ch import gpuvm
from provisioner.ch.config import GpuGroup, vm_spec
from provisioner.ch.vm import ChVm, vmm_pid_matches
from provisioner.errors import AgentError, HearthError, LeaseConflict, VmNotFound
from provisioner.events import NodeEvent, NodeState
from provisioner.net import bridge_facts, delete_tap, guest_mac, ipv4_routes, tap_exists, tap_name
from provisioner.node import ExpectedGpu, GpuRequest, GuestConfig, GuestNetwork, NodeSpec
from provisioner.processes import AdoptedProcess, terminate
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

    model_config = ConfigDict(extra="forbid")
    controller: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    lease_s: float = Field(default=30.0, ge=1, le=3600)
    budget_s: float = Field(default=300.0, gt=0, le=86400)  # seconds left of the node's boot_timeout
    node: NodeSpec
    standin: dict[str, Any] | None = None  # settings for cloud-hypervisor-standin; refused by a real VMM


class HostAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = HostRoot(config.host_root)
        self.ledger = Ledger(config.state_dir)
        self.envs = EnvStore(config.state_dir / "envs", config.env_margin)
        self.vms: dict[str, ChVm] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._promised: dict[str, list[tuple[int | None, int]]] = {}  # 1 GiB pages per NUMA node, by VM booting

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.bridge and not bridge_facts(self.config.bridge)["exists"]:
            self.ledger.close()
            raise AgentError(f"bridge {self.config.bridge} does not exist: create it (the hearth_network Ansible "
                             "role does, see docs/networking.md) or start the agent without --bridge")
        if self.config.bridge and self.config.subnet is None:
            self.ledger.close()
            raise AgentError("--bridge needs --subnet: the agent hands guests addresses from the host's subnet")
        self.config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._recover()
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        """Stop serving; the VMs keep running (a restarted agent adopts them)."""
        if self._reaper is not None:
            self._reaper.cancel()
        for vm in self.vms.values():
            await vm.detach()
        self.ledger.close()

    # -- inventory -------------------------------------------------------------------------------
    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU a VM could take (on vfio-pci, viable group), and who leases it."""
        topology = PciTopology(self.host)
        return [{"address": gpu.address, "numa": gpu.numa_node,
                 "functions": [c.address for c in topology.companions(gpu)],
                 "leased_to": self.ledger.holder(gpu.address)}
                for gpu in topology.gpus if gpu.driver == VFIO_DRIVER and topology.group_viable(gpu)]

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
            "network": self._network(),
        }
        if image is not None:
            info["image_problem"] = _image_problem(image)
        return info

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

    # -- VMs -------------------------------------------------------------------------------------
    async def create_vm(self, vm_id: str, request: CreateVm) -> dict[str, Any]:
        """Lease, start and boot; returns once vm.boot answered, within the request's budget. The same request
        again (a controller retrying after a dropped connection) gets the same VM."""
        deadline = time.monotonic() + request.budget_s
        if vm_id != request.node.id:
            raise AgentError(f"the VM id in the path ({vm_id}) is not the node's id ({request.node.id})")
        if vm_id in self.ledger.vms:
            lease = self.ledger.vms[vm_id]
            if (lease.controller, _uid(lease)) != (request.controller, request.node.uid):
                raise LeaseConflict(f"VM id {vm_id} is taken (controller {lease.controller}); stop that VM first")
            vm = self.vms.get(vm_id)
            if vm is not None:
                await vm.tracker.wait_for(NodeState.booting, max(deadline - time.monotonic(), 0.001))
            return self.vm(vm_id)
        if request.standin is not None and not _is_standin(self.config.cloud_hypervisor):
            raise AgentError("standin settings are for cloud-hypervisor-standin; this agent runs a real VMM")
        gpus = self._check_gpus(request.node.gpus)
        self._env_disk(request.node)
        async with self._lock:
            self.ledger.renew(request.controller, request.lease_s)
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
            self.vms[vm_id] = vm
            if vm.spec.layout is not None and vm.spec.layout.hugepages:
                self._promised[vm_id] = vm.spec.layout.hugepages  # taken from sysfs's free count once it booted
        try:
            await vm.start(deadline)
        except BaseException:
            self._promised.pop(vm_id, None)
            self._forget(vm_id, "its boot failed")
            raise
        self._promised.pop(vm_id, None)
        lease.booted = True
        self.ledger.save(lease)
        return self.vm(vm_id)

    def vm(self, vm_id: str) -> dict[str, Any]:
        if vm_id in self.vms:
            return _summary(self.vms[vm_id], self.ledger.vms.get(vm_id))
        if vm_id in self.ended:
            return self.ended[vm_id]
        raise VmNotFound(f"no VM {vm_id} on this host")

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

    def logs(self, vm_id: str) -> dict[str, str]:
        """A VM's serial console (kernel, initramfs, guest agent) and its VMM's log, each size-bounded."""
        self.vm(vm_id)  # VmNotFound for an id this agent does not know
        directory = self.config.run_dir / vm_id
        return {"serial": tail(directory / "serial.log"), "vmm": tail(directory / f"{ChVm.vmm}.log")}

    def list_vms(self) -> list[dict[str, Any]]:
        return [self.vm(v) for v in self.vms]

    async def watch(self, vm_id: str, after: int, wait: float, uid: str | None = None) -> dict[str, Any]:
        """The VM once it has more than `after` events (or has ended), or as it is after `wait` seconds.
        With `uid`, only that incarnation of the VM id: an earlier one is `NotFound`."""
        deadline = time.monotonic() + wait
        while True:
            summary = self.vm(vm_id)
            if uid is not None and summary["uid"] != uid:
                raise VmNotFound(f"VM {vm_id} is not (or no longer) the one with uid {uid}")
            if len(summary["events"]) > after or summary["state"] == "stopped" or time.monotonic() >= deadline:
                return summary
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())

    async def delete_vm(self, vm_id: str, grace: float = 5.0) -> dict[str, Any]:
        vm = self.vms.get(vm_id)
        if vm is None:
            return self.vm(vm_id)
        await vm.stop(grace)
        vm.remove_logs()
        return self.vm(vm_id)

    def renew(self, controller: str, ttl: float) -> dict[str, Any]:
        expires = self.ledger.renew(controller, ttl)
        return {"controller": controller, "expires_in": round(expires - time.time(), 3),
                "vms": sorted(v.id for v in self.ledger.vms.values() if v.controller == controller)}

    async def release(self, controller: str, why: str = "its controller released it", grace: float = 5.0) -> None:
        """Stop every VM of `controller` (each with `grace` seconds to power off) and forget its lease."""
        mine = [self.vms[v.id] for v in list(self.ledger.vms.values()) if v.controller == controller and v.id in self.vms]
        await asyncio.gather(*(vm.stop(grace) for vm in mine), return_exceptions=True)
        for vm in mine:
            vm.remove_logs()
        self.ledger.drop(controller, why)

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

    def _on_event(self, event: NodeEvent) -> None:
        if event.state == NodeState.stopped and event.node in self.vms:
            self._forget(event.node, event.detail or "stopped")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _forget(self, vm_id: str, why: str) -> None:
        vm = self.vms.pop(vm_id, None)
        if vm is not None:
            self.ended[vm_id] = _summary(vm, self.ledger.vms.get(vm_id))
        self.ledger.release(vm_id, why)
        cutoff = time.time() - KEEP_ENDED_S
        for old in [k for k, v in self.ended.items() if (v["events"] or [{"at": 0}])[-1]["at"] < cutoff]:
            del self.ended[old]

    async def _reap(self) -> None:
        """Stop the VMs of every controller that stopped renewing (the notebook died, the network split)."""
        while True:
            for controller in self.ledger.expired():
                await self.release(controller, "its controller's lease expired", grace=0)  # nobody is waiting
            await asyncio.sleep(REAP_INTERVAL)

    async def _recover(self) -> None:
        expired = set(self.ledger.expired())
        for lease in list(self.ledger.vms.values()):
            api_socket = self.config.run_dir / lease.id / "api.sock"
            pid = _find_vmm(api_socket)
            if pid is not None and lease.booted and lease.controller not in expired:
                try:
                    vm = self._vm(lease)
                    vm.tracker.transition(NodeState.requested, "adopted by a restarted agent")
                    vm.tracker.transition(NodeState.placed)
                    vm.tracker.transition(NodeState.vmm_started)
                    vm.tracker.transition(NodeState.booting)
                    self.vms[lease.id] = vm
                    await vm.adopt(pid, made_tap=lease.tap is not None)
                    continue
                except (HearthError, OSError) as error:
                    self.vms.pop(lease.id, None)
                    why = f"could not adopt it: {error}"
            else:
                why = ("its VMM was gone" if pid is None else "it had not booted when the agent stopped" if not lease.booted
                       else "its controller's lease had expired")
            await self._remove_remains(lease, pid, api_socket.parent)
            self.ledger.release(lease.id, f"agent restart: {why}")
        for controller in expired:
            self.ledger.drop(controller, "its controller's lease expired")

    async def _remove_remains(self, lease: VmLease, pid: int | None, directory: Path) -> None:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                process = AdoptedProcess(pid)
                if not await terminate(process, 0):
                    raise AgentError(f"VMM {pid} of VM {lease.id} outlived SIGKILL")
        if lease.tap and tap_exists(lease.tap):
            delete_tap(lease.tap)
        shutil.rmtree(directory, ignore_errors=True)


def _summary(vm: ChVm, lease: VmLease | None) -> dict[str, Any]:
    history = vm.history
    return {"id": vm.spec.node_id, "uid": _uid(lease) if lease else "",
            "state": history.state.value if history.state else "new",
            "controller": lease.controller if lease else None, "gpus": lease.gpus if lease else [],
            "address": lease.address if lease else None, "tap": lease.tap if lease else None,
            "pid": vm.process.pid if vm.process else None, "profile": history.profile(),
            "guest_profile": vm.guest_profile, "guest_gpus": vm.link.gpus,
            "layout": vm.spec.layout.model_dump(mode="json") if vm.spec.layout else None,
            "heard_s_ago": round(time.monotonic() - vm.channel.last_heard, 1) if vm.channel and vm.channel.last_heard else None,
            "events": [{"state": e.state.value, "at": e.at, "detail": e.detail} for e in history.events]}


def _nvswitch_text(count: int, fabric) -> str:
    mode = ("shared NVSwitch mode: NVLink partitions are Fabric Manager's to activate" if fabric.shared_nvswitch
            else "NVLink between a VM's GPUs needs it running with FABRIC_MODE=1")
    return f"NVSwitches: {count} stay with the host (VMs get GPUs only); {fabric.describe()} ({mode})"


def _uid(lease: VmLease) -> str:
    return lease.request.get("node", {}).get("uid", "")


def _is_standin(binary: str) -> bool:
    return Path(binary).name.endswith("-standin")


def _find_vmm(api_socket: Path) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if vmm_pid_matches(int(pid), api_socket) and "State:\tZ" not in _status(int(pid)):
            return int(pid)
    return None


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


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
