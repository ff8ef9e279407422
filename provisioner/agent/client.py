"""The controller's side of the host agent API: httpx over the agent's Unix socket.

A local host's socket is used as it is. For `ssh://user@host[:port]` the controller opens one SSH
connection (asyncssh; the user's keys and known_hosts, or the ones the hosts file names, and host keys
are always checked) and forwards a Unix socket in its run directory to the agent's socket on the host,
the way `ssh -L local.sock:/run/hearth/agent.sock` does, and connects again when it drops (tunnel.py). No
extra daemon or port: SSH is the authentication, the socket's group the authorisation to reach the agent.
Every new HTTP connection is a new SSH channel, so an agent that restarts is reached again without reconnecting.

Which controller calls is the agent's other question (auth.py): opening a controller's lease (`renew` the
first time) answers a secret, which the client keeps in memory only (`identity`) and sends with every
request after; a client made again for the same controller (a new SSH connection) carries it over.

`send_env` delivers an env image (envimage.py) the same way through either: it asks the host what it has and
streams only what is missing from the file, resuming from the host's count after a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from provisioner import userdirs
from provisioner.agent.auth import CONTROLLER_HEADER, SECRET_HEADER
from provisioner.agent.envstore import SIZE_HEADER
from provisioner.errors import AgentRefused, AgentUnreachable
from provisioner.hosts import Host


@dataclass(frozen=True)
class EnvSent:
    """What `send_env` did: the host had the image already, or how many bytes went and in how long."""
    host: str
    sha256: str
    already_there: bool
    bytes_sent: int
    seconds: float
    resumed: int = 0  # times the upload picked up again after a dropped connection


class AgentClient:
    def __init__(self, host: str, socket_path: Path, *, closers: list[Callable[[], Awaitable[None]]] = ()) -> None:
        self.host = host
        self.socket_path = socket_path
        # A Unix socket (the agent's, or its SSH forward) carries no TLS: no certificate store to load per host.
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
                                       base_url="http://hearth-agent", timeout=httpx.Timeout(30.0))
        self._closers = list(closers)
        self.calls = 0
        self.tunnel = None  # the SSH forward (tunnel.py) for a remote host
        self.calls_by_purpose: Counter[str] = Counter()  # what each request was for (the benchmark reports it)
        self.identity: tuple[str, str] | None = None  # (controller, secret) once its lease is open; never logged

    @property
    def identity(self) -> tuple[str, str] | None:
        return self._identity

    @identity.setter
    def identity(self, value: tuple[str, str] | None) -> None:
        self._identity = value
        for header in (CONTROLLER_HEADER, SECRET_HEADER):
            self._http.headers.pop(header, None)
        if value is not None:
            self._http.headers.update({CONTROLLER_HEADER: value[0], SECRET_HEADER: value[1]})

    async def info(self, image: Path | None = None) -> dict[str, Any]:
        return await self._call("GET", "/v1/info", params={"image": str(image)} if image else None)

    async def gpus(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/gpus")

    async def create_vm(self, vm_id: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/vms/{vm_id}", json=body, timeout=timeout)

    async def vm(self, vm_id: str, after: int = 0, wait: float = 0, uid: str | None = None,
                 until: str | None = None) -> dict[str, Any]:
        """The VM; with `wait`, once it has more than `after` events, or with `until` once it reached that state."""
        params = {"after": after, "wait": wait, **({"uid": uid} if uid else {}), **({"until": until} if until else {})}
        return await self._call("GET", f"/v1/vms/{vm_id}", params=params, timeout=wait + 30,
                                purpose=f"follow the VM until {until}" if until else "the VM's events")

    async def vm_logs(self, vm_id: str) -> dict[str, str]:
        return await self._call("GET", f"/v1/vms/{vm_id}/logs")

    async def vms(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/vms")

    async def delete_vm(self, vm_id: str, grace: float = 5.0) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/vms/{vm_id}", params={"grace": grace}, timeout=grace + 60)

    async def renew(self, controller: str, ttl: float) -> dict[str, Any]:
        """Open the controller's lease (the agent answers its secret, kept as `identity`) or renew it."""
        lease = await self._call("POST", f"/v1/leases/{controller}", params={"ttl": ttl})
        secret = lease.pop("secret", None)
        if secret is not None:  # a new lease (or one the agent opened again after it lapsed): its new secret
            self.identity = (controller, secret)
        return lease

    async def release(self, controller: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/leases/{controller}", timeout=120)

    async def envs(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/envs")

    async def delete_env(self, sha256: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/envs/{sha256}")

    async def send_env(self, image: Path, sha256: str, *, retries: int = 5, chunk: int = 1 << 20) -> EnvSent:
        """Make the host hold the env image `image` (whose sha256 is `sha256`): nothing is sent when it has it;
        otherwise the rest of the file is streamed from what the host has received, again after a dropped
        connection (or a restarted agent), up to `retries` times. The host's refusals (no room, a corrupted
        transfer) are raised as they are."""
        size = image.stat().st_size
        started, sent, resumed = time.monotonic(), 0, 0
        for attempt in range(retries + 1):
            try:
                state = await self._call("GET", f"/v1/envs/{sha256}", params={"size": size})
                if not state["complete"]:
                    offset, counted = state["received"], [0]
                    try:
                        state = await self._call("PUT", f"/v1/envs/{sha256}", params={"offset": offset},
                                                 headers={SIZE_HEADER: str(size), "Content-Length": str(size - offset)},
                                                 content=_read(image, offset, chunk, counted), timeout=300)
                    finally:
                        sent += counted[0]
                if state["complete"]:
                    return EnvSent(self.host, sha256, attempt == 0 and sent == 0, sent,
                                   round(time.monotonic() - started, 3), resumed)
            except (AgentUnreachable, AgentRefused) as error:
                # a dropped connection, or the host still finishing the dropped upload (409): ask again
                if isinstance(error, AgentRefused) and error.status != 409 or attempt == retries:
                    raise
            resumed += 1
            await asyncio.sleep(min(0.25 * 2 ** attempt, 4.0))
        raise AgentUnreachable(f"host {self.host}: env image {sha256[:12]} was still incomplete after {retries} retries")

    async def aclose(self) -> None:
        await self._http.aclose()
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()

    async def _call(self, method: str, path: str, timeout: float | None = None, purpose: str | None = None,
                    **kwargs: Any) -> Any:
        if timeout is not None:
            kwargs["timeout"] = timeout
        self.calls += 1
        self.calls_by_purpose[purpose or f"{method} {_route(path)}"] += 1
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            if self.tunnel is not None and self.tunnel.problem:
                raise AgentUnreachable(f"host {self.host}: {self.tunnel.problem}") from error
            raise AgentUnreachable(f"host {self.host}: the hearth agent at {self.socket_path} does not answer "
                                   f"({type(error).__name__}); is it running (systemctl status hearth-agent)?") from error
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip() or response.reason_phrase
        raise AgentRefused(self.host, response.status_code, message)


def _route(path: str) -> str:
    """A request's path with its VM, controller or image named generically: /v1/vms/{id}."""
    parts = path.split("/")
    return "/".join(parts[:3] + ["{id}"] + parts[4:]) if len(parts) > 3 else path


async def _read(path: Path, offset: int, chunk: int, counted: list[int]) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            counted[0] += len(block)
            yield block


async def connect(host: Host, local_dir: Path) -> AgentClient:
    """A client for `host`'s agent: its socket, or a forward of it through SSH into `local_dir`, kept up across
    dropped connections (tunnel.py)."""
    if host.address == "local":
        return AgentClient(host.name, host.agent_socket)
    from provisioner.agent.tunnel import SshTunnel

    userdirs.ensure(local_dir, "agent socket directory")  # whoever could swap the socket would get the Ray token
    tunnel = SshTunnel(host, local_dir / f"{host.name}.sock")
    await tunnel.open()
    client = AgentClient(host.name, tunnel.local, closers=[tunnel.close])
    client.tunnel = tunnel
    return client
