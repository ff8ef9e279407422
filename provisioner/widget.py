"""What a notebook shows for a cluster: a live ipywidgets view, or a static HTML summary.

The view is one HTML widget redrawn four times a second while the cluster changes: a grid of
nodes coloured by state (hover for the node's state, detail and boot phases), counts, elapsed time, the
Ray dashboard link, and the failures with their reasons. `summary_html` is the same picture, frozen
(`_repr_html_`, and the status page).
"""

from __future__ import annotations

import html
import time
from collections import Counter
from typing import Any

COLOURS = {"new": "#d9d9d9", "requested": "#d9d9d9", "placed": "#c6c6c6", "vmm_started": "#f4d58d",
           "booting": "#f2b84b", "guest_up": "#9ecae1", "ray_joined": "#6baed6", "ready": "#2a9d8f",
           "failed": "#e63946", "stopping": "#a0a0a0", "stopped": "#7a7a7a"}
BOOTING = {"new", "requested", "placed", "vmm_started", "booting", "guest_up", "ray_joined"}


def summary_html(summary: dict[str, Any], now: float | None = None) -> str:
    nodes = summary["nodes"]
    counts = Counter(n["state"] for n in nodes)
    booting = sum(counts[s] for s in BOOTING)
    started = summary.get("started_at")
    end = summary.get("ready_at") if summary.get("status") == "ready" else (now or time.time())
    elapsed = f"{end - started:.1f} s" if started and end else "-"
    ray = summary.get("ray") or {}
    link = (f'<a href="{html.escape(ray["dashboard"])}" target="_blank">Ray dashboard</a>'
            if ray.get("dashboard") else "")
    cells = "".join(
        f'<div title="{html.escape(_tooltip(n))}" style="width:14px;height:14px;border-radius:3px;'
        f'background:{COLOURS.get(n["state"], "#ccc")}"></div>' for n in nodes)
    failures = [n for n in nodes if n["errors"]]
    details = "".join(f"<li><b>{html.escape(n['id'])}</b> ({n['state']}): {html.escape('; then '.join(n['errors']))}</li>"
                      for n in failures)
    return (
        f'<div class="hearth-cluster" style="font-family:sans-serif;font-size:13px">'
        f'<div><b>hearth cluster {html.escape(summary["name"])}</b> ({html.escape(summary["backend"])}) '
        f'&mdash; {html.escape(summary["status"])}, {elapsed} {link}</div>'
        f'<div style="margin:4px 0"><span style="color:{COLOURS["ready"]}">{counts["ready"]} ready</span> / '
        f'{booting} booting / <span style="color:{COLOURS["failed"]}">{counts["failed"]} failed</span> '
        f'of {len(nodes)} nodes</div>'
        f'<div style="display:grid;grid-template-columns:repeat(auto-fill,16px);gap:2px;max-width:560px">{cells}</div>'
        + (f'<details open><summary>failures</summary><ul>{details}</ul></details>' if failures else "")
        + "</div>")


def _tooltip(node: dict[str, Any]) -> str:
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in node["profile"].items())
    return f"{node['id']} on {node['host']}: {node['state']}" + (f" ({node['detail']})" if node["detail"] else "") + \
        (f"\n{phases}" if phases else "")


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LiveView:
    """An ipywidgets HTML widget showing `summary()`; the cluster redraws it while anything changes."""

    def __init__(self, summary) -> None:
        import ipywidgets

        self._summary = summary
        self.widget = ipywidgets.HTML(summary_html(summary()))

    def redraw(self) -> None:
        self.widget.value = summary_html(self._summary())
