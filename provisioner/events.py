"""Node states, their legal transitions, the timestamped events, and the boot profile made from them.

    requested -> placed -> vmm_started -> booting -> guest_up -> ray_joined -> ready
    any of those -> failed(reason) | stopping;  failed -> stopping;  stopping -> stopped

Every change goes through `NodeHistory.transition`, which refuses an illegal one. The durations between
the boot states are the node's boot profile: what users see and benchmarks report, and how a slow boot
is diagnosed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import Enum

from pydantic import BaseModel

from provisioner.errors import InvalidTransition, NodeEnded, VmmTimeout


class NodeState(str, Enum):
    requested = "requested"
    placed = "placed"
    vmm_started = "vmm_started"
    booting = "booting"
    guest_up = "guest_up"
    ray_joined = "ray_joined"
    ready = "ready"
    failed = "failed"
    stopping = "stopping"
    stopped = "stopped"


BOOT_ORDER = [NodeState.requested, NodeState.placed, NodeState.vmm_started, NodeState.booting,
              NodeState.guest_up, NodeState.ray_joined, NodeState.ready]
TRANSITIONS: dict[NodeState, set[NodeState]] = {
    **{state: {BOOT_ORDER[i + 1], NodeState.failed, NodeState.stopping} for i, state in enumerate(BOOT_ORDER[:-1])},
    NodeState.ready: {NodeState.failed, NodeState.stopping},
    NodeState.failed: {NodeState.stopping, NodeState.stopped},
    NodeState.stopping: {NodeState.stopped, NodeState.failed},
    NodeState.stopped: set(),
}


class NodeEvent(BaseModel, frozen=True):
    node: str
    state: NodeState
    at: float  # time.time()
    detail: str | None = None


class NodeHistory:
    """One node's events, in order; `transition` appends one, checked against TRANSITIONS."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.events: list[NodeEvent] = []

    @property
    def state(self) -> NodeState | None:
        return self.events[-1].state if self.events else None

    def transition(self, state: NodeState, detail: str | None = None, at: float | None = None) -> NodeEvent:
        old = self.state
        if old is not None and state not in TRANSITIONS[old]:
            raise InvalidTransition(self.node, old, state)
        if old is None and state not in (NodeState.requested, NodeState.placed):
            raise InvalidTransition(self.node, NodeState.requested, state)
        event = NodeEvent(node=self.node, state=state, at=time.time() if at is None else at, detail=detail)
        self.events.append(event)
        return event

    def profile(self) -> dict[str, float]:
        """Seconds spent in each boot phase, named by the state it ended in (`booting`: from vmm_started
        to booting), plus `total` from the first event to the last boot state reached."""
        times = {e.state: e.at for e in self.events if e.state in BOOT_ORDER}
        reached = [s for s in BOOT_ORDER if s in times]
        phases = {later.value: round(times[later] - times[earlier], 6) for earlier, later in zip(reached, reached[1:])}
        if len(reached) > 1:
            phases["total"] = round(times[reached[-1]] - times[reached[0]], 6)
        return phases


OnEvent = Callable[[NodeEvent], None]
TERMINAL = (NodeState.failed, NodeState.stopping, NodeState.stopped)
ENDING = (NodeState.stopping, NodeState.stopped)  # still reachable from the terminal states


class NodeTracker:
    """A node's history plus the ways to follow it: an `on_event` callback, and `wait_for(state)`."""

    def __init__(self, history: NodeHistory, on_event: OnEvent | None = None) -> None:
        self.history = history
        self.on_event = on_event
        self._waiters: list[tuple[NodeState, asyncio.Future]] = []

    @property
    def state(self) -> NodeState | None:
        return self.history.state

    def transition(self, state: NodeState, detail: str | None = None, at: float | None = None) -> None:
        """`at`: when it happened, if not now (an event relayed from a host agent, on the host's clock)."""
        if at is not None and self.history.events:
            at = max(at, self.history.events[-1].at)  # clocks differ a little between hosts: never go back
        event = self.history.transition(state, detail, at)
        if self.on_event is not None:
            self.on_event(event)
        for waited, future in list(self._waiters):
            if not future.done():
                if self.reached(waited):
                    future.set_result(None)
                elif state in TERMINAL and waited not in ENDING:
                    future.set_exception(NodeEnded(f"node {self.history.node} {state.value} before {waited.value}"
                                                   + (f": {detail}" if detail else ""), detail))
                else:
                    continue
            self._waiters.remove((waited, future))

    def reached(self, state: NodeState) -> bool:
        return any(e.state == state for e in self.history.events)

    async def wait_for(self, state: NodeState, timeout: float) -> None:
        """Until the node reaches `state`; `NodeEnded` if it fails or stops first, `VmmTimeout` after `timeout`."""
        if self.reached(state):
            return
        if self.state in TERMINAL and state not in ENDING:
            last = self.history.events[-1].detail
            raise NodeEnded(f"node {self.history.node} is {self.state.value}, it will not become {state.value}"
                            + (f": {last}" if last else ""), last)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((state, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise VmmTimeout(f"node {self.history.node}: not {state.value} after {timeout:g} s "
                             f"(still {self.state.value})") from None
