"""The `cloud-hypervisor` backend: a microVM per node, with whole GPUs through VFIO, made by the hosts' agents.

    open()   connect to every host's agent (its socket, or through SSH), check the image is there, and
             return the GPUs they have free; then renew this controller's lease on every host, every
             lease_s / 3 seconds, for as long as the cluster lives
    node()   an `AgentVm`: PUT the VM on its host's agent, then follow its events (long polls)
    close()  release the lease on every host (the agents stop whatever VMs are left), close the tunnels

When the controller dies (the kernel is killed, the network splits) nothing renews its lease and every
agent stops its VMs within lease_s. The guest learns how to join Ray over the guest channel (address,
token, labels), which ends at its host's agent, never from a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner.agent.client import AgentClient, connect
from provisioner.backends import JoinInfo
from provisioner.errors import SpecError
from provisioner.errors import AgentRefused, AgentUnreachable, InvalidTransition
from provisioner.events import ENDING, TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.placement import GpuSlot, NodePlacement, host_slots
from provisioner.spec import ClusterSpec
from provisioner.hosts import Host

StandinSettings = Callable[[str], dict[str, Any]]
AGENT_GONE_S = 60.0  # how long a node waits for its agent to come back (a restart) before it counts as failed


class CloudHypervisorBackend:
    name = "cloud-hypervisor"
    physical_gpus = True

    def __init__(self, spec: ClusterSpec, hosts: list[Host], run_dir: Path, *,
                 standin: StandinSettings | None = None, lease_s: float = 30.0) -> None:
        self.spec = spec
        self.hosts = {h.name: h for h in hosts}
        self.run_dir = run_dir
        self.standin = standin  # stand-in VMM settings per node id, for tests and benchmarks
        self.lease_s = lease_s
        self.controller = f"{spec.name}-{secrets.token_hex(4)}"
        self.agents: dict[str, AgentClient] = {}
        self._renewer: asyncio.Task | None = None

    async def open(self) -> list[GpuSlot]:
        """Connect to every agent; the free GPUs. Fails (closing what it opened) when a host is unreachable
        or lacks the image."""
        results = await asyncio.gather(*(connect(h, self.run_dir / "agents") for h in self.hosts.values()),
                                       return_exceptions=True)
        self.agents = {c.host: c for c in results if isinstance(c, AgentClient)}
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            infos = await asyncio.gather(*(a.info(self.spec.image) for a in self.agents.values()))
            problems = [f"host {a.host}: {i['image_problem']}" for a, i in zip(self.agents.values(), infos)
                        if i.get("image_problem")]
            if problems:
                raise SpecError("; ".join(problems))
            free = await asyncio.gather(*(a.gpus() for a in self.agents.values()))
        except BaseException:
            await self.close()
            raise
        await asyncio.gather(*(a.renew(self.controller, self.lease_s) for a in self.agents.values()))
        self._renewer = asyncio.create_task(self._renew())
        return [slot for agent, gpus in zip(self.agents.values(), free) for slot in host_slots(self.hosts[agent.host], gpus)]

    def stop_renewing(self) -> None:
        """As if this controller died: its agents reap its VMs when the lease runs out."""
        if self._renewer is not None:
            self._renewer.cancel()

    async def close(self) -> None:
        self.stop_renewing()
        await asyncio.gather(*(a.release(self.controller) for a in self.agents.values()), return_exceptions=True)
        await asyncio.gather(*(a.aclose() for a in self.agents.values()), return_exceptions=True)
        self.agents = {}

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await asyncio.gather(*(a.renew(self.controller, self.lease_s) for a in self.agents.values()),
                                 return_exceptions=True)  # a host that misses one renewal has two more chances

    def node(self, placement: NodePlacement, join: JoinInfo, history: NodeHistory,
             on_event: OnEvent | None) -> AgentVm:
        body = {
            "controller": self.controller, "uid": secrets.token_hex(8), "lease_s": self.lease_s, "cpus": self.spec.cpus,
            "memory_mib": self.spec.memory_gib * 1024, "image": str(self.spec.image),
            "gpus": [{"address": g.address, "clique": g.clique} for g in placement.gpus],
            "guest": {"ray": {"address": join.address, "token": join.token, "labels": join.labels,
                              "num_cpus": join.num_cpus, "num_gpus": join.num_gpus}, "env": join.env},
        }
        if self.standin is not None:
            body["standin"] = self.standin(placement.node_id)
        return AgentVm(self.agents[placement.host], placement.node_id, body, history, on_event,
                       boot_timeout=self.spec.boot_timeout)


class AgentVm:
    """One node's VM on its host's agent, mirrored here: the agent's events become this node's events."""

    def __init__(self, agent: AgentClient, node_id: str, body: dict[str, Any], history: NodeHistory,
                 on_event: OnEvent | None, boot_timeout: float) -> None:
        self.agent = agent
        self.node_id = node_id
        self.body = body
        self.tracker = NodeTracker(history, on_event)
        self.history = history
        self.boot_timeout = boot_timeout
        self.exited = asyncio.Event()
        self._seen = 0
        self._created = False
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """PUT the VM; returns once its vm.boot answered. Its events are followed meanwhile, so a long
        vm.boot shows as booting. A dropped connection (the agent restarting) is retried: PUT is idempotent."""
        self._watcher = asyncio.create_task(self._watch())
        try:
            vm = await self._reaching(lambda: self.agent.create_vm(self.node_id, self.body, timeout=self.boot_timeout))
        except BaseException:
            self._watcher.cancel()
            raise
        self._created = True
        self._mirror(vm)

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        await self.tracker.wait_for(state, timeout)

    async def stop(self, grace: float = 5.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.history.state not in ENDING:
            self.tracker.transition(NodeState.stopping)
        with contextlib.suppress(AgentRefused, AgentUnreachable, asyncio.TimeoutError):
            await asyncio.wait_for(self._reaching(lambda: self.agent.delete_vm(self.node_id, grace)), grace + 60)
        self._end()

    def _end(self) -> None:
        if self.history.state not in ENDING:
            self.tracker.transition(NodeState.stopping)
        if self.history.state != NodeState.stopped:
            self.tracker.transition(NodeState.stopped)
        self.exited.set()

    async def _watch(self) -> None:
        while True:
            try:
                vm = await self._reaching(lambda: self.agent.vm(self.node_id, self._seen, 20, self.body["uid"]))
            except AgentRefused as error:
                if error.status != 404:  # the agent failed to answer: say so, rather than end silently
                    if self.history.state not in TERMINAL:
                        self.tracker.transition(NodeState.failed, str(error))
                    return
                if not self._created:  # the PUT has not reached the agent yet
                    await asyncio.sleep(0.1)
                    continue
                vm = {"events": [], "state": "stopped"}  # the agent restarted and had to drop it
                if self.history.state not in TERMINAL:
                    self.tracker.transition(NodeState.failed, "its host agent lost it (an agent restart)")
            except AgentUnreachable as error:
                if self.history.state not in TERMINAL:
                    self.tracker.transition(NodeState.failed, str(error))
                return
            self._mirror(vm)
            if vm["state"] == "stopped":
                self._end()
                return

    def _mirror(self, vm: dict[str, Any]) -> None:
        """Take the agent's new events (its requested/placed are the engine's here)."""
        events = vm["events"]
        if len(events) < self._seen:  # a restarted agent adopted the VM and began a new history
            self._seen = 0
        for event in events[self._seen:]:
            state = NodeState(event["state"])
            if state in (NodeState.requested, NodeState.placed) or self.tracker.reached(state):
                continue
            with contextlib.suppress(InvalidTransition):
                self.tracker.transition(state, event.get("detail"), at=event["at"])
        self._seen = len(events)

    async def _reaching(self, call: Callable[[], Any]) -> Any:
        """`call()`, retried while the agent cannot be reached, for up to AGENT_GONE_S."""
        deadline = time.monotonic() + AGENT_GONE_S
        while True:
            try:
                return await call()
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)

