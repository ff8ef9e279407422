"""A cluster's boot as a timeline: one row per node, its phases on a time axis all nodes share, so stragglers
and waiting show at a glance. One model, drawn twice: as HTML/CSS here (the notebook's live view and the
status page, view.py) and as a PNG by `hearth bench boot --plot` (bench/plot.py).

A phase is named, and coloured, by the state it ends in, as boot profiles are (events.py, profile.py): the
bar from `placed` to `vmm_started` is the VMM's start. A node still in a phase has a striped bar up to now; a failure
is a red tick where it happened. Time counts from `Cluster(...)` (the summary's `created_at`), and the Ray
head's start, when there is one, has a row of its own.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

from provisioner.events import BOOT_ORDER, NodeState
from provisioner.profile import phase_names

COLOURS = {"placed": "#c6c6c6", "vmm_started": "#f4d58d", "booting": "#f2b84b", "guest_up": "#9ecae1",
           "ray_joined": "#6baed6", "ready": "#2a9d8f", "head": "#b39ddb", "failed": "#e63946"}
ORDER = [s.value for s in BOOT_ORDER]


@dataclass(frozen=True)
class Bar:
    phase: str  # the state it ends in, or "head"
    start: float  # seconds from the timeline's origin
    end: float
    running: bool = False  # still going on at `now`


@dataclass(frozen=True)
class Row:
    name: str
    bars: list[Bar]
    failed_at: float | None = None
    title: str = ""


def rows(summary: dict[str, Any], now: float | None = None) -> tuple[float, float, list[Row]]:
    """(origin, span in seconds, rows): the Ray head's row (if any) and one row per node."""
    now = now or time.time()
    events = [e for n in summary["nodes"] for e in n.get("events", [])]
    origin = summary.get("created_at") or min((e["at"] for e in events), default=now)
    ended = summary.get("ready_at") or summary.get("ended_at")
    found: list[Row] = []
    head = summary.get("head") or {}
    if "starting" in head:
        end = head.get("up") or head.get("failed") or head.get("stopped") or now
        found.append(Row("Ray head", [Bar("head", head["starting"] - origin, end - origin, "up" not in head)],
                         (head["failed"] - origin) if "failed" in head else None, "the Ray head's start"))
    names = phase_names(summary.get("backend", ""))
    for node in summary["nodes"]:
        bars, failed_at = [], None
        boot = [e for e in node.get("events", []) if e["state"] in ORDER]
        for event, following in zip(boot, boot[1:] + [None]):
            if event["state"] == NodeState.ready.value:
                break
            if following is not None:
                bars.append(Bar(following["state"], event["at"] - origin, following["at"] - origin))
            elif node["state"] == event["state"]:  # still in the phase that ends in the next state
                upcoming = ORDER[ORDER.index(event["state"]) + 1]
                bars.append(Bar(upcoming, event["at"] - origin, max(now, event["at"]) - origin, True))
        failures = [e for e in node.get("events", []) if e["state"] == NodeState.failed.value]
        if failures:
            failed_at = failures[-1]["at"] - origin
        phases = ", ".join(f"{names.get(b.phase, b.phase)} {b.end - b.start:.2f} s" for b in bars)
        found.append(Row(node["id"], bars, failed_at, f"{node['id']} on {node.get('host') or 'no host'}: {node['state']}"
                         + (f" ({node['detail']})" if node.get("detail") else "") + (f"\n{phases}" if phases else "")))
    last = max([b.end for r in found for b in r.bars] + [r.failed_at or 0 for r in found] + [0.0])
    span = max(last, (ended - origin) if ended else 0.0, 0.001)
    return origin, span, found


_STYLE = ("<style>.hearth-tl{font-size:11px;margin:4px 0;max-width:760px}"
          ".hearth-tl .r{display:flex;align-items:center}"
          ".hearth-tl .n{width:110px;flex:none;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;color:#555}"
          ".hearth-tl .t{position:relative;flex:1;background:#f4f4f4}"
          ".hearth-tl .t i{position:absolute;top:0;bottom:0;min-width:1px}"
          ".hearth-tl .t b{position:absolute;top:-1px;bottom:-1px;width:2px;background:#e63946}"
          ".hearth-tl .lg span{display:inline-block;width:10px;height:10px;margin:0 3px 0 8px;vertical-align:middle}"
          + "".join(f".hearth-tl .{p}{{background:{c}}}" for p, c in COLOURS.items())
          + ".hearth-tl .run{background-image:repeating-linear-gradient(135deg,rgba(255,255,255,.5) 0 3px,"
          "transparent 3px 6px)}</style>")  # a phase still going on: striped, in its own colour


def timeline_html(summary: dict[str, Any], now: float | None = None, *, max_height: int = 360) -> str:
    """The timeline as HTML and CSS (no script): rows of bars, an axis in seconds, a legend. Many nodes get
    thinner rows without names, in a box that scrolls past `max_height` pixels; hover a row for its phases."""
    origin, span, found = rows(summary, now)
    if not found:
        return ""
    many = len(found) > 40
    height = 4 if many else 10

    def pct(seconds: float) -> str:
        return f"{100 * max(seconds, 0.0) / span:.2f}%"

    lines = []
    for row in found:
        bars = "".join(f'<i class="{b.phase}{" run" if b.running else ""}" style="left:{pct(b.start)};'
                       f'width:{pct(b.end - b.start)}"></i>' for b in row.bars)
        if row.failed_at is not None:
            bars += f'<b style="left:{pct(row.failed_at)}"></b>'
        name = "" if many else f'<span class="n">{html.escape(row.name)}</span>'
        lines.append(f'<div class="r" title="{html.escape(row.title)}" style="margin:{0 if many else 1}px 0">'
                     f'{name}<div class="t" style="height:{height}px">{bars}</div></div>')
    names = phase_names(summary.get("backend", ""))
    legend = "".join(f'<span class="{state}"></span>{html.escape(name)}' for state, name in names.items()
                     if state in COLOURS and state != "placed")
    if summary.get("head"):
        legend = '<span class="head"></span>Ray head' + legend
    axis = (f'<div class="r" style="color:#888"><span class="n"></span><div style="flex:1;display:flex;'
            f'justify-content:space-between"><span>0 s</span><span>{span / 2:.1f} s</span><span>{span:.1f} s</span>'
            "</div></div>")
    return (f'{_STYLE}<div class="hearth-tl"><div style="max-height:{max_height}px;overflow-y:auto">{"".join(lines)}</div>'
            f'{axis}<div class="lg" style="color:#555">{legend}</div></div>')
