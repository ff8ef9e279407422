"""The terminal's view of a boot: one live line while nodes boot, then a table of boot profiles."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner.events import NodeEvent, NodeState
from provisioner.profile import phase_names, seconds


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


def profile_table(nodes: list[dict[str, Any]], backend: str) -> Group:
    """Each node's boot profile (seconds per phase, named for `backend`) from `ClusterRun.summary()["nodes"]`,
    and, for VMs whose guest agent reports them, the phases inside the boot."""
    names = phase_names(backend)
    table = Table(title="boot profile: seconds in each phase", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("state")
    for name in names.values():
        table.add_column(name, justify="right")
    for node in nodes:
        profile = node["profile"]
        table.add_row(node["id"], node["state"], *(seconds(profile.get(state)) for state in names))
    inside = list(dict.fromkeys(k for node in nodes for k in node.get("guest_profile") or {}))
    if not inside:
        return Group(table)
    guest = Table(title="inside the VMs, seconds: VMM start to kernel (firmware), kernel and initramfs, guest agent "
                        "to its hello, `ray start`", title_justify="left")
    guest.add_column("node", no_wrap=True)
    for phase in inside:
        guest.add_column(phase, justify="right")
    for node in nodes:
        phases = node.get("guest_profile") or {}
        guest.add_row(node["id"], *(f"{phases[p]:.2f}" if p in phases else "-" for p in inside))
    return Group(table, guest)
