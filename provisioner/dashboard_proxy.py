"""A cluster's Ray dashboard through Jupyter: `/hearth/clusters/NAME/dashboard/`, the Ray token added here.

Ray's dashboard wants its token (`RAY_AUTH_MODE=token`) on every request: an `authorization: Bearer` header,
or the `ray-authentication-token` cookie its login prompt sets. A browser has neither and should not: the
token lets anyone run code on the cluster. So the Jupyter server, behind its own authentication
(`tornado.web.authenticated`: no Jupyter login, no page), fetches each request from the dashboard with the
token it reads from the cluster's state directory (`token`, mode 0600, written by whoever owns the cluster),
and hands back the answer. Then the link works from any browser that reaches Jupyter (JupyterHub, a remote
Lab), and Ray's single-page app never sees a 401, so it never shows its token prompt; it asks for its files
and APIs by relative paths (`static/...`, `api/...`), which land under this prefix.

What crosses, and what does not:
- to Ray: the path and query (less Jupyter's `token`), `accept` headers and the Ray token; never the
  browser's cookies or `authorization` header (Jupyter's own credentials).
- to the browser: status, body, and a few content headers; never `set-cookie` (Ray's login would put the
  token in one), and never a body that contains the token (refused instead).
- GET and HEAD only: the view is read-only. Ray's dashboard refuses other methods from browsers itself (its
  `browser_request_middleware`), Jupyter's XSRF check would stop them from the app anyway, and jobs are
  submitted and stopped with `cluster.submit_job`/`cluster.job_client()` in the notebook.

Why tornado's own client and not jupyter-server-proxy: the target is per cluster and read from its state
when the request comes (clusters come and go; no server config names them), the one thing added is a
header, and the Ray app needs no websocket. jupyter-server-proxy proxies arbitrary ports under `/proxy/`
(a wider door than one cluster's dashboard), would add a dependency and its process management for none
of that, and its header hook is static configuration.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

import tornado.web
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from provisioner.supervisor import alive, read_state, state_root

NAME = r"[a-z0-9][a-z0-9-]{0,23}"  # a cluster name (spec.py's rule): never anything that walks out of the root
MAX_BODY = 64 * 1024 * 1024
TO_RAY = ("accept", "accept-language", "if-none-match", "if-modified-since")
TO_BROWSER = ("content-type", "cache-control", "etag", "last-modified", "content-disposition")
_client: AsyncHTTPClient | None = None


def dashboard_of(name: str) -> tuple[str, str]:
    """The dashboard's address and the Ray token of a running cluster of this user; HTTPError 404 if none."""
    if not re.fullmatch(NAME, name):
        raise tornado.web.HTTPError(404, "no such cluster")
    directory: Path = state_root() / name
    state = read_state(directory)
    head = (state or {}).get("head") or {}
    if not alive(state) or state.get("status") not in ("booting", "ready") or "up" not in head or "stopped" in head:
        raise tornado.web.HTTPError(404, f"cluster {name} has no Ray head running")
    try:
        token = (directory / "token").read_text().strip()
    except OSError:
        raise tornado.web.HTTPError(404, f"cluster {name} keeps no token for its dashboard") from None
    return state["ray"]["dashboard"], token


class DashboardProxy(JupyterHandler):
    @tornado.web.authenticated
    async def get(self, name: str, path: str) -> None:
        global _client
        upstream, token = dashboard_of(name)
        query = urlencode([(k, v) for k, values in self.request.query_arguments.items() if k != "token"
                           for v in values])
        prefix = url_path_join(self.base_url, f"hearth/clusters/{name}/dashboard/")
        raw_path = self.request.path[len(prefix):]  # as sent (still percent-encoded)
        url = f"{upstream}/{raw_path.lstrip('/')}" + (f"?{query}" if query else "")
        headers = {k: self.request.headers[k] for k in TO_RAY if k in self.request.headers}
        headers["authorization"] = f"Bearer {token}"
        if _client is None:
            _client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_BODY)
        response = await _client.fetch(HTTPRequest(url, method=self.request.method, headers=headers,
                                                   follow_redirects=False, connect_timeout=10, request_timeout=60,
                                                   allow_nonstandard_methods=True),
                                       raise_error=False)
        if response.code == 599:
            raise tornado.web.HTTPError(502, f"cluster {name}'s Ray dashboard did not answer: {response.error}")
        body = response.body or b""
        if token.encode() in body:
            self.log.warning("hearth: withheld a response from cluster %s's dashboard (%s): it held the Ray token",
                             name, raw_path.split("?")[0])
            raise tornado.web.HTTPError(502, "the dashboard's answer held the cluster's token; withheld")
        self.set_status(response.code, response.reason)
        for key in TO_BROWSER:
            if key in response.headers:
                self.set_header(key, response.headers[key])
        if body and self.request.method != "HEAD":
            self.write(body)
        await self.finish()

    head = get

    def post(self, *args: str) -> None:
        raise tornado.web.HTTPError(405, "the Ray dashboard is read-only through Jupyter: use cluster.submit_job() or "
                                         "cluster.job_client() in the notebook")

    put = patch = delete = post


class DashboardRedirect(JupyterHandler):
    """`.../dashboard` without its slash: the app's relative paths need it."""

    @tornado.web.authenticated
    def get(self, name: str) -> None:
        self.redirect(self.request.path + "/")
