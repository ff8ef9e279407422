"""The terminal's view of a boot: one live line while nodes boot, then a table of boot profiles."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner.events import BOOT_ORDER, NodeEvent, NodeState

PHASES = [s.value for s in BOOT_ORDER[1:]]
SHORT = {"placed": "place", "vmm_started": "vmm", "booting": "create", "guest_up": "guest",
         "ray_joined": "join", "ready": "ready", "total": "total"}


class ProgressLine:
    """Feed it NodeEvents (`update`); it keeps one line current: counts by state and elapsed time."""

    def __init__(self, total: int, console: Console | None = None, what: str = "nodes") -> None:
        self.total, self.what = total, what
        self.states: dict[str, NodeState] = {}
        self.started = time.monotonic()
        self.console = console or Console(stderr=True, highlight=False)
        self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)

    def __enter__(self) -> ProgressLine:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(*exc)
        self.console.print(self._render())

    def update(self, event: NodeEvent) -> None:
        self.states[event.node] = event.state
        self.live.update(self._render())

    def _render(self) -> Text:
        counts = Counter(state for state in self.states.values())
        ready = counts[NodeState.ready]
        failed = counts[NodeState.failed]
        done = {NodeState.ready, NodeState.failed, NodeState.stopping, NodeState.stopped}
        booting = sum(n for state, n in counts.items() if state not in done)
        text = Text(f"{self.what}: ")
        text.append(f"{ready}/{self.total} ready", style="green")
        text.append(f", {booting} booting")
        if failed:
            text.append(f", {failed} failed", style="red")
        text.append(f"  {time.monotonic() - self.started:.1f} s", style="dim")
        return text


def profile_table(nodes: list[dict[str, Any]]) -> Table:
    """Each node's boot profile (seconds per phase) from `ClusterRun.summary()["nodes"]`, and, for VMs whose
    guest agent reports them, the phases inside the boot (firmware, kernel, guest agent, `ray start`)."""
    inside = list(dict.fromkeys(k for node in nodes for k in node.get("guest_profile") or {}))
    table = Table(title="boot profile: seconds to reach each state (place, vmm_started, booting, guest_up, "
                        "ray_joined, ready) from the one before"
                        + ("; inside the VM: QEMU to kernel, kernel to guest agent, agent to hello, `ray start`"
                           if inside else ""), title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("state")
    for phase in (*PHASES, "total"):
        table.add_column(SHORT[phase], justify="right")
    for phase in inside:
        table.add_column(phase, justify="right", style="dim")
    for node in nodes:
        profile, guest = node["profile"], node.get("guest_profile") or {}
        table.add_row(node["id"], node["state"],
                      *(f"{profile[p]:.2f}" if p in profile else "-" for p in (*PHASES, "total")),
                      *(f"{guest[p]:.2f}" if p in guest else "-" for p in inside))
    return table
