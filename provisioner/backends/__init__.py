"""Where nodes run. A backend makes node processes; a node process boots, joins Ray and stops:

    await backend.open() -> free GPUs       reach the hosts (their agents), before anything is placed
    backend.node(placement, join, history, on_event) -> NodeProcess
    await process.start()                   returns once the node is booting (its VMM or process runs)
    await process.wait_for(state, timeout)  until ray_joined (the guest or process says it joined)
    await process.stop()                    shut down in steps; leave nothing behind
    process.exited                          an asyncio.Event set when the node's process ends

    await backend.close()                   after the last node stopped: let go of the hosts

`local` (one `ray start` process per node, no VM, no GPU) and `cloud-hypervisor` (a microVM per node,
made by each host's agent) implement it; the engine decides readiness itself, from the Ray head.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from provisioner.events import NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.placement import GpuSlot, NodePlacement


class JoinInfo(BaseModel, frozen=True):
    """What a node needs to join the cluster's Ray head. The token never goes on a command line."""

    address: str
    token: str
    num_cpus: int
    num_gpus: int
    labels: dict[str, str]
    env: dict[str, str] = {}


class NodeProcess(Protocol):
    history: NodeHistory
    tracker: NodeTracker

    async def start(self) -> None: ...

    async def wait_for(self, state: NodeState, timeout: float) -> None: ...

    async def stop(self, grace: float = ...) -> None: ...


class Backend(Protocol):
    name: str
    physical_gpus: bool  # whether nodes take GPUs from the hosts (VMs), or Ray fakes them (local)

    async def open(self) -> list[GpuSlot]: ...

    async def close(self) -> None: ...

    def node(self, placement: NodePlacement, join: JoinInfo, history: NodeHistory,
             on_event: OnEvent | None) -> NodeProcess: ...
