"""A jupyter-server extension: hearth's status page at `/hearth/` and its JSON at `/hearth/api/clusters`.

It lists the clusters this user's kernels and `hearth up` are running (from the state files they keep, see
supervisor.py), with their nodes, states, boot profiles and hosts, and for admins the `hearth vfio status`
of this host. Both routes use the server's own authentication (tornado's `authenticated`): no token, no
page. Installed with the package and enabled by `etc/jupyter/jupyter_server_config.d/hearth.json`.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from provisioner.supervisor import alive, read_state, state_root
from provisioner.widget import summary_html


def clusters() -> list[dict[str, Any]]:
    found = []
    root = state_root()
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        state = read_state(directory)
        if state and alive(state) and state.get("status") not in ("stopped",):
            found.append({**state, "html": summary_html(state)})
    return found


def hosts() -> list[dict[str, Any]]:
    from vfio.hostroot import HostRoot
    from vfio.inventory import host_report
    from vfio.render import report_json

    return [{"name": socket.gethostname(), "vfio": json.loads(report_json(host_report(HostRoot())))}]


class ClustersHandler(APIHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.finish(json.dumps({"clusters": clusters(), "hosts": hosts()}))


class PageHandler(JupyterHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.finish(PAGE.replace("{{api}}", url_path_join(self.base_url, "hearth/api/clusters")))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "provisioner.jupyter"}]


def _load_jupyter_server_extension(serverapp) -> None:
    base = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(".*$", [
        (url_path_join(base, "hearth/api/clusters"), ClustersHandler),
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
<h2>Hosts: VFIO</h2><div id="hosts"></div>
<script>
const mark = {ok: "✓", info: "·", warning: "!", error: "✗"};
function esc(s) { return String(s ?? "").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function phases(p) { return Object.entries(p).map(([k, v]) => `${k} ${v.toFixed(2)}s`).join(", "); }
function cluster(c) {
  const rows = c.nodes.map(n => `<tr><td>${esc(n.id)}</td><td>${esc(n.host)}</td><td>${esc(n.state)}</td>
    <td>${esc(n.detail)}</td><td>${esc(phases(n.profile))}</td></tr>`).join("");
  return `<div class="cluster">${c.html}<table><tr><th>node</th><th>host</th><th>state</th><th>detail</th>
    <th>boot profile</th></tr>${rows}</table></div>`;
}
function host(h) {
  const r = h.vfio;
  const findings = r.host.map(f => `<div class="${f.severity}">${mark[f.severity]} ${esc(f.message)}</div>`).join("");
  const gpus = r.gpus.map(g => `<tr><td>${esc(g.device.address)}</td><td>${esc(g.device.name)}</td>
    <td>${esc(g.device.driver || "none")}</td><td>${g.device.iommu_group ?? "-"}</td><td>${g.group_viable ? "yes" : "no"}</td>
    <td>${g.findings.map(f => `<span class="${f.severity}">${esc(f.message)}</span>`).join("<br>")}</td></tr>`).join("");
  return `<h3>${esc(h.name)}</h3>${findings}` + (gpus ? `<table><tr><th>address</th><th>name</th><th>driver</th>
    <th>group</th><th>viable</th><th>problems</th></tr>${gpus}</table>` : "<p>No NVIDIA GPUs on this host.</p>");
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
