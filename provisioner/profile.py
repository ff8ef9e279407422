"""Boot profiles as people read them: phases named for what they are on the node's backend, seconds to 0.01.

The engine records node states (events.py), and a node's profile is keyed by the state each phase ended in.
What a state means depends on the backend: on `local`, "vmm_started" is its `ray start` process being
spawned and "guest_up" its first line of output; on a VM backend they are the VMM process and the guest
agent's hello. Phases that cannot take time on a backend (placement and "booting" on `local`) are left out.

The cluster has a profile too, counted from the moment `Cluster(...)` ran: the Ray head's start, then the
nodes' boot (in parallel, so about the slowest node), then the total.
"""

from __future__ import annotations

import html
from typing import Any

LOCAL = {"vmm_started": "spawn", "guest_up": "first output", "ray_joined": "ray start", "ready": "seen by head"}
VM = {"placed": "place", "vmm_started": "VMM start", "booting": "create+boot", "guest_up": "guest agent up",
      "ray_joined": "ray start", "ready": "seen by head"}


def phase_names(backend: str) -> dict[str, str]:
    """State a phase ended in -> what to call it on `backend` (in boot order), plus "total"."""
    return {**(LOCAL if backend == "local" else VM), "total": "total"}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def cluster_profile(summary: dict[str, Any]) -> dict[str, float]:
    """Seconds from `Cluster(...)` to the Ray head's start being done, for the nodes after it, and in total."""
    created, head = summary.get("created_at"), summary.get("head") or {}
    phases = {}
    if created and "up" in head:
        phases["Ray head"] = head["up"] - created
        if summary.get("ready_at"):
            phases["nodes"] = summary["ready_at"] - head["up"]
    if created and summary.get("ready_at"):
        phases["total"] = summary["ready_at"] - created
    return phases


def cluster_profile_line(summary: dict[str, Any]) -> str:
    phases = cluster_profile(summary)
    return ", ".join(f"{name} {seconds(value)} s" for name, value in phases.items())


class NodeTable(list):
    """`cluster.nodes`: the list of node dicts it always was, shown as a table (HTML in a notebook, text in
    IPython's terminal), each boot phase named for the backend."""

    def __init__(self, nodes: list[dict[str, Any]], backend: str, caption: str = "") -> None:
        super().__init__(nodes)
        self.backend = backend
        self.caption = caption

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        names = phase_names(self.backend)
        header = ["node", "host", "state", "attempts", *names.values(), "detail"]
        rows = [[n["id"], n["host"] or "-", n["state"], str(n["attempts"]),
                 *(seconds(n["profile"].get(state)) for state in names),
                 _detail(n)] for n in self]
        return header, rows

    def _repr_html_(self) -> str:
        header, rows = self._rows()
        caption = (f'<caption style="text-align:left">{html.escape(self.caption)} '
                   "(boot phases in seconds)</caption>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f'<table class="hearth-nodes">{caption}<tr>{head}</tr>{body}</table>'

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        header, rows = self._rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [self.caption] if self.caption else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        printer.text("\n".join(lines))


def _detail(node: dict[str, Any]) -> str:
    if node["state"] == "failed" or (node["errors"] and node["state"] != "ready"):
        return node["errors"][-1] if node["errors"] else (node["detail"] or "")
    if node["errors"]:
        return f"recovered after: {node['errors'][0]}"
    return ""
