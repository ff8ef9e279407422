"""The `cloud-hypervisor` backend: a microVM per node, with whole GPUs through VFIO, made by the hosts' agents.

    open()   connect to every host's agent (its socket, or through SSH), check the image is there, and
             return the GPUs they have free; then renew this controller's lease on every host, every
             lease_s / 3 seconds, for as long as the cluster lives
    node()   an `AgentVm`: PUT the node's `NodeSpec` on its host's agent (with what is left of its boot
             deadline), then follow it with a long poll until it joined Ray and one until it ends; its logs
             and inner boot phases come from there
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
from provisioner.envimage import LocalImage
from provisioner.errors import AgentRefused, AgentUnreachable, InvalidTransition, SpecError
from provisioner.events import ENDING, TERMINAL, NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.hosts import Host
from provisioner.node import NodeSpec
from provisioner.placement import GpuSlot, host_slots

StandinSettings = Callable[[str], dict[str, Any]]
AGENT_GONE_S = 60.0  # how long a node waits for its agent to come back (an agent restart, a dropped SSH
# connection made again: agent/tunnel.py) before it counts as failed


class CloudHypervisorBackend:
    name = "cloud-hypervisor"
    physical_gpus = True

    def __init__(self, hosts: list[Host], run_dir: Path, *, cluster: str, image: Path | None,
                 standin: StandinSettings | None = None, lease_s: float = 30.0) -> None:
        self.image = image
        self.hosts = {h.name: h for h in hosts}
        self.run_dir = run_dir
        self.standin = standin  # stand-in VMM settings per node id, for tests and benchmarks
        self.lease_s = lease_s
        self.controller = f"{cluster}-{secrets.token_hex(4)}"
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
            infos = await asyncio.gather(*(a.info(self.image) for a in self.agents.values()))
            problems = [f"host {a.host}: {i['image_problem']}" for a, i in zip(self.agents.values(), infos)
                        if i.get("image_problem")]
            if problems:
                raise SpecError("; ".join(problems))
            free = await self.free()
        except BaseException:
            await self.close()
            raise
        await asyncio.gather(*(a.renew(self.controller, self.lease_s) for a in self.agents.values()))
        self._renewer = asyncio.create_task(self._renew())
        return free

    async def free(self) -> list[GpuSlot]:
        """The GPUs every host has free now, as its agent says (GET /v1/gpus)."""
        free = await asyncio.gather(*(a.gpus() for a in self.agents.values()))
        return [slot for agent, gpus in zip(self.agents.values(), free) for slot in host_slots(self.hosts[agent.host], gpus)]

    async def carry(self, image: LocalImage) -> dict[str, dict]:
        """Send the env image to every host that lacks it, all at once; what it took on each."""
        sent = await asyncio.gather(*(a.send_env(image.path, image.sha256) for a in self.agents.values()))
        return {s.host: {"already_there": s.already_there, "bytes_sent": s.bytes_sent, "seconds": s.seconds}
                for s in sent}

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

    def node(self, spec: NodeSpec, history: NodeHistory, on_event: OnEvent | None) -> AgentVm:
        request = {"controller": self.controller, "lease_s": self.lease_s, "node": spec.model_dump(mode="json")}
        if self.standin is not None:
            request["standin"] = self.standin(spec.id)
        return AgentVm(self.agents[spec.host], spec, request, NodeTracker(history, on_event))


class AgentVm:
    """One node's VM on its host's agent, mirrored here: the agent's events become this node's events."""

    def __init__(self, agent: AgentClient, spec: NodeSpec, request: dict[str, Any], tracker: NodeTracker) -> None:
        self.agent = agent
        self.node_id = spec.id
        self.uid = spec.uid
        self.request = request  # the agent's CreateVm, but for `budget_s`, which start() adds
        self.tracker = tracker
        self.history = tracker.history
        self.guest_profile: dict[str, float] = {}
        self.exited = asyncio.Event()
        self._seen = 0
        self._watcher: asyncio.Task | None = None

    async def start(self, deadline: float) -> None:
        """PUT the VM; returns once its vm.boot answered, with its events so far (VMM started, booting). The
        agent gets what is left of the boot deadline and bounds its own waits by it. A dropped connection (the
        agent restarting) is retried: PUT is idempotent. Then one long poll follows the VM to ray_joined."""
        def create() -> Any:
            budget = max(deadline - time.monotonic(), 0.001)
            return self.agent.create_vm(self.node_id, {**self.request, "budget_s": budget}, timeout=budget + 10)

        vm = await self._reaching(create)
        self._mirror(vm)
        self._watcher = asyncio.create_task(self._watch())

    async def logs(self) -> str:
        """The VM's serial console and its VMM's log, as its host agent keeps them."""
        try:
            logs = await self.agent.vm_logs(self.node_id)
        except (AgentRefused, AgentUnreachable) as error:
            return f"(no logs: {error})"
        return "\n".join(part for part in (logs["serial"], logs["vmm"] and f"--- cloud-hypervisor log ---\n{logs['vmm']}")
                         if part)

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
        """Follow the VM with as few requests as its life allows: one long poll until it joined Ray (or failed),
        then one at a time until it ends, each up to the agent's 60 s limit. So a node costs the agent a PUT, two
        GETs and a DELETE; its events before vm.boot answered come with the PUT's answer."""
        while True:
            until = NodeState.stopped if self.tracker.reached(NodeState.ray_joined) else NodeState.ray_joined
            try:
                vm = await self._reaching(lambda: self.agent.vm(self.node_id, self._seen, 60, self.uid, until.value))
            except AgentRefused as error:
                if error.status != 404:  # the agent failed to answer: say so, rather than end silently
                    if self.history.state not in TERMINAL:
                        self.tracker.transition(NodeState.failed, str(error))
                    return
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
        self.guest_profile = vm.get("guest_profile") or self.guest_profile
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

