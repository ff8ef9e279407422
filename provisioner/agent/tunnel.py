"""The SSH forward to a remote host's agent, kept up for as long as the controller needs the host.

One asyncssh connection per host (the user's keys and known_hosts, or those the hosts file names; host keys
are always checked) forwards a Unix socket in the controller's own run directory to the agent's socket on the
host, as `ssh -L local.sock:/run/hearth/agent.sock host` does. Every HTTP connection to the local socket is a
channel of that one SSH connection.

Connections drop: sshd restarts, a NAT or firewall forgets an idle flow, the network blips. A drop is noticed
when the connection closes, or, when the peer vanishes without a word, by SSH keepalives (KEEPALIVE_S x
KEEPALIVE_COUNT). The tunnel then connects again, backing off up to RETRY_MAX_S between tries, for as long as
it is open, and forwards the same local path again. Meanwhile a call through it fails as `AgentUnreachable`,
which the controller retries (backends/cloud_hypervisor.py: each node's watch and start, the lease renewer),
so each node's watch resumes from the last event it saw and the lease is renewed again; a node fails only if
its host stays out of reach for AGENT_GONE_S. The agent does not care which connection a request comes by:
creating a VM again with the same request gets the same VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

from provisioner.errors import AgentUnreachable
from provisioner.hosts import Host

KEEPALIVE_S = 5.0
KEEPALIVE_COUNT = 3
RETRY_MAX_S = 5.0


class SshTunnel:
    def __init__(self, host: Host, local: Path) -> None:
        self.host = host
        self.local = local
        self.drops = 0  # connections lost and made again: for `hearth hosts check`, the tests, the curious
        self.problem: str | None = None  # why the tunnel is down now (None: up)
        self._connection: Any = None
        self._listener: Any = None
        self._keeper: asyncio.Task | None = None
        self._closing = False

    async def open(self) -> None:
        """Connect and forward; `AgentUnreachable` with the fix when the host cannot be reached at first (a bad
        address or key is not something to retry)."""
        await self._connect()
        self._keeper = asyncio.create_task(self._keep())

    async def close(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self._disconnect()
        self.local.unlink(missing_ok=True)

    async def _connect(self) -> None:
        import asyncssh

        user, hostname, port = re.fullmatch(r"ssh://(?:([^@/\s]+)@)?([^@/:\s]+)(?::(\d+))?", self.host.address).groups()
        options: dict[str, Any] = {"port": int(port or 22), "username": user, "keepalive_interval": KEEPALIVE_S,
                                   "keepalive_count_max": KEEPALIVE_COUNT}
        if self.host.ssh_identity is not None:
            options["client_keys"] = [str(self.host.ssh_identity)]
        if self.host.ssh_known_hosts is not None:
            options["known_hosts"] = str(self.host.ssh_known_hosts)
        try:
            connection = await asyncssh.connect(hostname, **options)
        except (OSError, asyncssh.Error) as error:
            raise AgentUnreachable(f"host {self.host.name}: cannot connect over SSH to {self.host.address}: {error}. "
                                   "Check the controller's key is in the host's authorized_keys and the host key in "
                                   "known_hosts") from error
        self.local.unlink(missing_ok=True)  # the last connection's socket; the directory is ours (userdirs.py)
        try:
            listener = await connection.forward_local_path(str(self.local), str(self.host.agent_socket))
        except (OSError, asyncssh.Error) as error:
            connection.close()
            raise AgentUnreachable(f"host {self.host.name}: cannot forward {self.local} to {self.host.agent_socket} "
                                   f"over SSH: {error}") from error
        self._connection, self._listener, self.problem = connection, listener, None

    async def _disconnect(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._connection is not None:
            self._connection.close()
            with contextlib.suppress(Exception):
                await self._connection.wait_closed()
        self._connection = self._listener = None

    async def _keep(self) -> None:
        """Wait for the connection to drop; then connect again until it works (or the tunnel is closed)."""
        while not self._closing:
            with contextlib.suppress(Exception):
                await self._connection.wait_closed()
            if self._closing:
                return
            self.drops += 1
            self.problem = f"the SSH connection to {self.host.address} dropped; connecting again"
            await self._disconnect()
            delay = 0.1
            while not self._closing:
                try:
                    await self._connect()
                    break
                except AgentUnreachable as error:
                    self.problem = f"the SSH connection to {self.host.address} dropped, and connecting again failed: {error}"
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
