"""A jupyter-server extension: hearth's status page at `/hearth/`, its JSON at `/hearth/api/clusters`, and each
cluster's Ray dashboard at `/hearth/clusters/NAME/dashboard/` (dashboard_proxy.py).

The page lists the clusters this user's kernels and `hearth up` are running (from the state files they keep,
see supervisor.py), with their nodes, states, boot profiles and hosts, and for admins the `hearth vfio status`
of this host; on a host without GPUs it says so and folds that report away. Every route uses the server's
own authentication (tornado's `authenticated`): no Jupyter login, no page. Installed with the package and
enabled by `etc/jupyter/jupyter_server_config.d/hearth.json`.

The extension also tells the kernels this server starts where it serves these pages (its base URL, which
JupyterHub makes `/user/NAME/`), in their environment: the cluster view links through it.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from provisioner.dashboard_proxy import NAME, DashboardProxy, DashboardRedirect
from provisioner.profile import phase_names
from provisioner.supervisor import alive, read_state, state_root
from provisioner.view import BASE_URL_ENV, summary_html


def clusters(base_url: str) -> list[dict[str, Any]]:
    found = []
    root = state_root()
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        state = read_state(directory)
        if state and alive(state) and state.get("status") not in ("stopped",):
            found.append({**state, "html": summary_html(state, base_url=base_url, view="page"),
                          "phase_names": phase_names(state.get("backend", ""))})
    return found


def hosts() -> list[dict[str, Any]]:
    """This host's VFIO report, and whether it has GPUs at all (`gpu_host`): on one without, the report is
    nothing a notebook user can act on."""
    from vfio.hostroot import HostRoot
    from vfio.inventory import host_report
    from vfio.render import report_json

    report = host_report(HostRoot())
    return [{"name": socket.gethostname(), "gpu_host": bool(report.gpus), "vfio": json.loads(report_json(report))}]


class ClustersHandler(APIHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.finish(json.dumps({"clusters": clusters(self.base_url), "hosts": hosts()}))


class PageHandler(JupyterHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.finish(PAGE.replace("{{api}}", url_path_join(self.base_url, "hearth/api/clusters")))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "provisioner.jupyter"}]


def _load_jupyter_server_extension(serverapp) -> None:
    base = serverapp.web_app.settings["base_url"]
    os.environ[BASE_URL_ENV] = base  # kernels inherit the server's environment
    serverapp.web_app.add_handlers(".*$", [
        (url_path_join(base, "hearth/api/clusters"), ClustersHandler),
        (url_path_join(base, f"hearth/clusters/({NAME})/dashboard/(.*)"), DashboardProxy),
        (url_path_join(base, f"hearth/clusters/({NAME})/dashboard"), DashboardRedirect),
        (url_path_join(base, "hearth/?"), PageHandler),
    ])


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>hearth</title>
<style>
body { font-family: sans-serif; margin: 24px; color: #222 }
h1 { font-size: 20px } h2 { font-size: 16px; margin-top: 28px }
table { border-collapse: collapse; font-size: 13px } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left }
.ok { color: #2a9d8f } .warning { color: #b8860b } .error { color: #e63946 } .info { color: #777 }
.cluster { margin-bottom: 18px } #updated { color: #999; font-size: 12px }
</style></head>
<body>
<h1>hearth</h1><div id="updated"></div>
<h2>Clusters</h2><div id="clusters">loading&hellip;</div>
<h2>This host</h2><div id="hosts"></div>
<script>
const mark = {ok: "✓", info: "·", warning: "!", error: "✗"};
function esc(s) { return String(s ?? "").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function phases(p, names) {
  return Object.entries(names).filter(([k]) => k in p).map(([k, name]) => `${name} ${p[k].toFixed(2)} s`).join(", ");
}
function cluster(c) {
  const rows = c.nodes.map(n => `<tr><td>${esc(n.id)}</td><td>${esc(n.host)}</td><td>${esc(n.state)}</td>
    <td>${esc(n.detail)}</td><td>${esc(phases(n.profile, c.phase_names))}</td></tr>`).join("");
  return `<div class="cluster">${c.html}<table><tr><th>node</th><th>host</th><th>state</th><th>detail</th>
    <th>boot profile</th></tr>${rows}</table></div>`;
}
function host(h) {
  const r = h.vfio;
  const findings = r.host.map(f => `<div class="${f.severity}">${mark[f.severity]} ${esc(f.message)}</div>`).join("");
  const gpus = r.gpus.map(g => `<tr><td>${esc(g.device.address)}</td><td>${esc(g.device.name)}</td>
    <td>${esc(g.device.driver || "none")}</td><td>${g.device.iommu_group ?? "-"}</td><td>${g.group_viable ? "yes" : "no"}</td>
    <td>${g.findings.map(f => `<span class="${f.severity}">${esc(f.message)}</span>`).join("<br>")}</td></tr>`).join("");
  if (!h.gpu_host) {
    return `<h3>${esc(h.name)}: not a GPU host</h3><p>No NVIDIA GPUs here, so nothing to bind to VFIO: clusters on this
      host use the local backend. GPU hosts are prepared by an admin (see hearth's Ansible roles).</p>
      <details><summary>VFIO report for admins</summary>${findings}</details>`;
  }
  return `<h3>${esc(h.name)}</h3>${findings}<table><tr><th>address</th><th>name</th><th>driver</th>
    <th>group</th><th>viable</th><th>problems</th></tr>${gpus}</table>`;
}
async function refresh() {
  const response = await fetch("{{api}}", {credentials: "same-origin"});
  if (!response.ok) { document.getElementById("clusters").textContent = `error ${response.status}`; return; }
  const data = await response.json();
  document.getElementById("clusters").innerHTML = data.clusters.length ? data.clusters.map(cluster).join("")
    : "<p>No clusters running. Start one in a notebook: <code>Cluster(nodes=2)</code>, or <code>hearth up</code>.</p>";
  document.getElementById("hosts").innerHTML = data.hosts.map(host).join("");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
