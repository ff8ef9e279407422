"""What a notebook shows for a cluster: one output that follows it live and, saved, shows how it was last seen.

It is `summary_html` of `ClusterRun.summary()`: a headline with the elapsed time since `Cluster(...)` ran,
the Ray head's phase (starting, up, failed, stopped) with links to its dashboard and hearth's status page
through Jupyter, node counts that add up to the nodes shown, a grid of nodes coloured by state (hover for
a node's boot phases), and the failures with their reasons.

`LiveView` displays it as plain `text/html` with a display id, and replaces it in place (`update_display`)
four times a second while the cluster changes and every `HEARTBEAT_S` otherwise. Not an ipywidget: a widget
output cannot fall back to anything in JupyterLab, which prefers the widget's mimetype and shows "Error
displaying widget: model not found" once the kernel that held the model is gone (a restart, a saved notebook
reopened), and after a restart Lab drops every message from the old kernel, so it cannot be swapped out
then. An HTML output is simply the last state it was given, live or saved, in Lab, Notebook, VS Code,
nbviewer and GitHub alike.

A kernel that ends without a word (restarted, killed) cannot say so itself: the live HTML carries a notice
that a CSS animation reveals `STALE_AFTER` seconds after it was drawn, and each redraw is a new element,
so its clock starts again. When the cluster ends (closed, failed) the output becomes the final summary,
without that notice.
"""

from __future__ import annotations

import html
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from provisioner.profile import cluster_profile_line, phase_names, seconds

COLOURS = {"new": "#d9d9d9", "requested": "#d9d9d9", "placed": "#c6c6c6", "vmm_started": "#f4d58d",
           "booting": "#f2b84b", "guest_up": "#9ecae1", "ray_joined": "#6baed6", "ready": "#2a9d8f",
           "failed": "#e63946", "stopping": "#a0a0a0", "stopped": "#7a7a7a"}
BOOTING = {"new", "requested", "placed", "vmm_started", "booting", "guest_up", "ray_joined"}
OUTCOMES = ("ready", "booting", "failed", "stopped")
HEARTBEAT_S = 3.0
STALE_AFTER = 12  # four heartbeats
BASE_URL_ENV = "HEARTH_JUPYTER_BASE_URL"  # set by hearth's jupyter-server extension for the kernels it starts


def outcome(node: dict[str, Any]) -> str:
    """One of OUTCOMES, so counts add up: a node whose current attempt failed counts as failed after it was
    stopped too; a node that failed once and then came up on its retry is ready (and `recovered`)."""
    if node["state"] == "ready":
        return "ready"
    if node["state"] in BOOTING:
        return "booting"
    if node["state"] == "failed" or any(e["state"] == "failed" for e in node.get("events", [])):
        return "failed"
    return "stopped"


def recovered(node: dict[str, Any]) -> bool:
    return bool(node["errors"]) and outcome(node) != "failed"


def jupyter_base_url() -> str | None:
    """Where this kernel's Jupyter server serves hearth's pages (its base URL), if it runs hearth's extension."""
    return os.environ.get(BASE_URL_ENV)


def summary_html(summary: dict[str, Any], *, now: float | None = None, base_url: str | None = None,
                 view: str = "saved", note: str | None = None) -> str:
    """The cluster as HTML. `base_url`: the Jupyter server's, for links through it (none without one).
    `view`: "live" (LiveView's: when it was drawn, and the stale-kernel notice), "saved" (a snapshot:
    says when it was taken), or "page" (the status page, which refreshes itself).
    `note`: a last word to show (why the view ended)."""
    live = view == "live"
    now = now or time.time()
    nodes = summary["nodes"]
    counts = Counter(outcome(n) for n in nodes)
    ended = summary.get("ended_at") is not None  # torn down: nothing will change any more
    cells = "".join(
        f'<div title="{html.escape(_tooltip(n, summary["backend"]))}" style="width:14px;height:14px;border-radius:3px;'
        f'background:{COLOURS["failed"] if outcome(n) == "failed" else COLOURS.get(n["state"], "#ccc")}"></div>'
        for n in nodes)
    count_line = " &middot; ".join(
        f'<span style="color:{COLOURS[o] if counts[o] and o in ("ready", "failed") else "inherit"}">{counts[o]} {o}</span>'
        for o in OUTCOMES) + f" &mdash; of {len(nodes)} nodes"
    if any(recovered(n) for n in nodes):
        count_line += f" ({sum(recovered(n) for n in nodes)} recovered on a retry)"
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    footer = f"updated {clock}" if live and not ended else f"as of {clock}"
    return (
        '<div class="hearth-cluster" style="font-family:sans-serif;font-size:13px;line-height:1.6">'
        f'<div><b>hearth cluster {html.escape(summary["name"])}</b> ({html.escape(summary["backend"])}) '
        f'&mdash; <span class="hearth-status">{html.escape(_headline(summary, now))}</span></div>'
        + _head_line(summary, now, base_url, fades=live and not ended)
        + _env_line(summary)
        + f'<div class="hearth-counts">{count_line}</div>'
        f'<div style="display:grid;grid-template-columns:repeat(auto-fill,16px);gap:2px;max-width:560px;margin:2px 0">'
        f'{cells}</div>'
        + _problems(summary, nodes)
        + (f'<div class="hearth-note"><b>{html.escape(note)}</b></div>' if note else "")
        + (f'<div class="hearth-updated" style="color:#888;font-size:11px">{footer}</div>' if view != "page" else "")
        + (_STALE if live and not ended else "")
        + "</div>")


_STALE = (
    # Animations override inline styles, so the notice opens STALE_AFTER s after this HTML was drawn, unless a
    # newer redraw (a new element, a new animation) came first.
    "<style>@keyframes hearth-stale { to { max-height: 6em; } } @keyframes hearth-gone { to { visibility: hidden; } }"
    "</style>"
    f'<div class="hearth-stale" style="max-height:0;overflow:hidden;color:#b00;'
    f'animation:hearth-stale 0s linear {STALE_AFTER}s forwards">'
    f"No word from the kernel for {STALE_AFTER} s: it was restarted, shut down or cannot be reached. "
    "This view is stale; a cluster ends with the kernel that started it.</div>")


def _env_line(summary: dict[str, Any]) -> str:
    """The environment image the VM nodes run from: which, how big, and what carrying it to each host took."""
    env = summary.get("env")
    if not env:
        return ""
    return (f'<div class="hearth-env">environment {html.escape(env["sha256"][:12])}, {env["size"] / (1 << 20):.0f} MiB, '
            f'{html.escape(env_text(env))}</div>')


def env_text(env: dict[str, Any]) -> str:
    """One line: packed or found packed, and per host there already or sent in how long (also `hearth status`)."""
    packed = "packed before" if env["cached"] else f"packed in {env['pack_s']:.1f} s"
    hosts = "; ".join(f"{host}: " + ("there already" if sent["already_there"]
                                     else f"sent {sent['bytes_sent'] / (1 << 20):.0f} MiB in {sent['seconds']:.1f} s")
                      for host, sent in sorted(env["hosts"].items()))
    python = "the controller's own Python" if env["interpreter"] == "shipped" else "the guest image's Python"
    return f"{packed}, Ray on {python}" + (f"; {hosts}" if hosts else "")


def _headline(summary: dict[str, Any], now: float) -> str:
    created = summary.get("created_at") or summary.get("started_at")
    status = summary["status"]
    if status in ("new", "booting"):
        ready = sum(n["state"] == "ready" for n in summary["nodes"])
        what = (f"booting, {ready} of {len(summary['nodes'])} ready" if summary["nodes"] else "booting")
        return f"{what}, {now - created:.1f} s" if created else what
    if status == "ready":
        profile = cluster_profile_line(summary)
        return f"ready ({profile})" if profile else "ready"
    if status == "failed":
        end = summary.get("ended_at") or now
        what = "cancelled while booting" if summary.get("error") == "cancelled" else "failed"
        return f"{what} after {end - created:.1f} s" if created else what
    return status


def _head_line(summary: dict[str, Any], now: float, base_url: str | None, fades: bool) -> str:
    """`fades`: the dashboard link goes with the stale-kernel notice (the head dies with the kernel)."""
    head = summary.get("head")
    if head is None:
        return ""
    if "stopped" in head:
        text = "stopped"
    elif "failed" in head:
        text = f"failed to start after {head['failed'] - head['starting']:.1f} s"
    elif "up" in head:
        text = f"up (started in {head['up'] - head['starting']:.1f} s)"
    elif "starting" in head:
        text = f"starting the Ray head, {now - head['starting']:.1f} s (nodes start once it is up)"
    else:
        text = "not started yet"
    links = []
    if base_url is not None:
        if "up" in head and "stopped" not in head and summary["status"] in ("booting", "ready"):
            dashboard = f"{base_url.rstrip('/')}/hearth/clusters/{summary['name']}/dashboard/"
            fade = f";animation:hearth-gone 0s linear {STALE_AFTER}s forwards" if fades else ""
            links.append(f'<a href="{html.escape(dashboard)}" target="_blank" rel="noopener" '
                         f'style="color:#1a6fb5;text-decoration:underline{fade}">Ray dashboard</a>')
        links.append(f'<a href="{html.escape(base_url.rstrip("/"))}/hearth/" target="_blank" rel="noopener" '
                     'style="color:#1a6fb5;text-decoration:underline">hearth status page</a>')
    return (f'<div class="hearth-head">Ray head: {html.escape(text)}'
            + (" &middot; " + " &middot; ".join(links) if links else "") + "</div>")


def _problems(summary: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    items = []
    if summary["status"] == "failed" and summary.get("error"):
        items.append(f'<li style="white-space:pre-wrap">{html.escape(summary["error"])}</li>')
    else:
        items += [f"<li><b>{html.escape(n['id'])}</b> failed: {html.escape('; then '.join(n['errors']) or n['detail'] or '')}"
                  "</li>" for n in nodes if outcome(n) == "failed"]
    items += [f"<li><b>{html.escape(n['id'])}</b> recovered on attempt {n['attempts']}; before: "
              f"{html.escape('; then '.join(n['errors']))}</li>" for n in nodes if recovered(n)]
    return f'<details open><summary>problems</summary><ul style="margin:2px 0">{"".join(items)}</ul></details>' if items else ""


def _tooltip(node: dict[str, Any], backend: str) -> str:
    names = phase_names(backend)
    phases = ", ".join(f"{name} {seconds(node['profile'][state])} s" for state, name in names.items()
                       if state in node["profile"])
    return f"{node['id']} on {node['host'] or 'no host'}: {node['state']}" + (f" ({node['detail']})" if node["detail"] else "") + \
        (f"\n{phases}" if phases else "")


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LiveView:
    """The cluster's output in a notebook; `redraw()` may be called from any thread (ipykernel sends display
    updates from any), and sends only what changed."""

    def __init__(self, summary: Callable[[], dict[str, Any]]) -> None:
        from IPython.display import display

        self._summary = summary
        self._base_url = jupyter_base_url()
        self._lock = threading.Lock()  # the loop's redraws and the kernel's close() must not cross: last is final
        self.ended = False
        self._shown = self._bundle(summary(), "live")
        self._handle = display(self._shown, raw=True, display_id=True)

    def redraw(self) -> None:
        with self._lock:
            if self.ended:
                return
            current = self._summary()
            if current.get("ended_at") is not None:  # torn down (failing is not the end: teardown follows)
                self._end(current, None)
                return
            bundle = self._bundle(current, "live")
            if bundle != self._shown:
                self._shown = bundle
                self._handle.update(bundle, raw=True)

    def end(self, note: str | None = None) -> None:
        """Show the final summary (and `note`), and stop redrawing."""
        with self._lock:
            if not self.ended:
                self._end(self._summary(), note)

    def _end(self, current: dict[str, Any], note: str | None) -> None:
        self.ended = True
        self._handle.update(self._bundle(current, "saved", note), raw=True)

    def _bundle(self, current: dict[str, Any], view: str, note: str | None = None) -> dict[str, str]:
        return {"text/html": summary_html(current, base_url=self._base_url, view=view, note=note),
                "text/plain": _plain(current)}


def _plain(summary: dict[str, Any]) -> str:
    counts = Counter(outcome(n) for n in summary["nodes"])
    return (f"hearth cluster {summary['name']}: {summary['status']}, "
            + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES) + f" of {len(summary['nodes'])} nodes")
