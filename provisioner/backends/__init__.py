"""Where nodes run: the whole backend contract, typed here and checked by the engine.

A backend makes node processes from `NodeSpec`s; a node process boots, joins Ray and stops:

    await backend.open() -> free GPUs       reach the hosts (their agents), before anything is placed
    await backend.free() -> free GPUs       ask them again (after a 409: another controller took a GPU since)
    await backend.carry(image) -> {host: d}  VMs: put the controller's environment image where the VMs can
                                            attach it (sent to each host that lacks it); what it took per host
    backend.node(spec, history, on_event)   -> NodeProcess (made, not started)
    await process.start(deadline)           returns once the node is booting (its VMM or process runs);
                                            `deadline` (time.monotonic) bounds every wait, here or on a host
    await process.wait_for(state, timeout)  until ray_joined (the guest or process says it joined)
    await process.stop(grace)               polite first, then forced; leave nothing behind
    process.exited                          an asyncio.Event set when the node's process ends
    process.guest_profile                   the phases inside a VM's boot (empty without a VM)
    await process.logs()                    the node's console and its VMM's log, size-bounded
    await backend.close()                   after the last node stopped: let go of the hosts

`local` (one `ray start` process per node, no VM), `qemu` (a VM per node on this machine) and
`cloud-hypervisor` (a microVM per node, made by each host's agent) implement it; the engine decides
readiness itself, from the Ray head. The states a node goes through are in events.py.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from provisioner.envimage import LocalImage
from provisioner.events import NodeHistory, NodeState, NodeTracker, OnEvent
from provisioner.node import NodeSpec
from provisioner.placement import GpuSlot


class NodeProcess(Protocol):
    history: NodeHistory
    tracker: NodeTracker
    exited: asyncio.Event
    guest_profile: dict[str, float]

    async def start(self, deadline: float) -> None: ...

    async def wait_for(self, state: NodeState, timeout: float) -> None: ...

    async def stop(self, grace: float = ...) -> None: ...

    async def logs(self) -> str: ...


NODE_PROCESS = ("history", "tracker", "exited", "guest_profile", "start", "wait_for", "stop", "logs")


class Backend(Protocol):
    name: str
    physical_gpus: bool  # whether nodes take GPUs from the hosts (VMs), or Ray fakes them (local)

    async def open(self) -> list[GpuSlot]: ...

    async def free(self) -> list[GpuSlot]: ...

    async def carry(self, image: LocalImage) -> dict[str, dict]: ...

    async def close(self) -> None: ...

    def node(self, spec: NodeSpec, history: NodeHistory, on_event: OnEvent | None) -> NodeProcess: ...


def checked(backend: Backend, process: object) -> NodeProcess:
    """What `backend.node()` returned, if it is a NodeProcess; else a TypeError that says what was expected
    (FLAME's runner does the same with what its backends return)."""
    missing = [name for name in NODE_PROCESS if not hasattr(process, name)]
    if missing:
        raise TypeError(f"backend {backend.name!r} returned {type(process).__name__} from node(), which lacks "
                        f"{', '.join(missing)}: expected a NodeProcess (see provisioner/backends/__init__.py)")
    for name in ("start", "wait_for", "stop", "logs"):
        if not asyncio.iscoroutinefunction(getattr(process, name)):
            raise TypeError(f"backend {backend.name!r}: {type(process).__name__}.{name} must be a coroutine function")
    return process
