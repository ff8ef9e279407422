"""Who calls the host agent, and what they may do.

Everyone who reaches the socket is in its group (admins, and the controllers' SSH user, whose sshd forwards
every remote controller's connections). That says nothing about which controller calls, so two facts do:

    the peer's uid    SO_PEERCRED of the connection: a local user, or for a controller coming in over SSH the
                      SSH user that sshd's forwarding process runs as (one uid for every remote controller)
    its secret        issued to a controller when it opens its lease (`POST /v1/leases/{controller}` answers
                      it once, in the body); the controller keeps it in memory and sends it with every request
                      (CONTROLLER_HEADER: its name, SECRET_HEADER: the secret). The agent keeps only its
                      sha256 (controllers.json, 0600), and it appears on no command line and in no log.

What each may do:

    root (uid 0, naming no controller)   everything: it is root on the host anyway (an SSH login as root too)
    a controller (its name and secret, from the uid that opened its lease)
                                         its own lease and VMs: renew, release, create, watch, logs, delete
    anyone who reaches the socket        the inventory (info, gpus), env images, opening a new lease
Anything else is refused with 403, saying what was missing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

from provisioner.agent.ledger import ControllerLease
from provisioner.errors import AgentError

CONTROLLER_HEADER = "X-Hearth-Controller"
SECRET_HEADER = "X-Hearth-Secret"
CONTROLLER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a controller's name: it appears in logs and JSON
SECRET = re.compile(r"[A-Za-z0-9_-]{32,128}")


class Forbidden(AgentError):
    status = 403


def new_secret() -> tuple[str, str]:
    """A controller's secret, and the digest the agent keeps of it."""
    secret = secrets.token_urlsafe(32)
    return secret, digest(secret)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_controller(name: str) -> str:
    if not CONTROLLER.fullmatch(name):
        raise AgentError(f"{name[:80]!r} is not a controller name: 1 to 64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return name


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None when unknown."""
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
    return uid


@dataclass(frozen=True)
class Caller:
    """One request's caller: its uid, and the controller it proved to be (None: it named none, or failed to)."""

    uid: int | None
    controller: str | None = None
    named: str | None = None  # the controller it named, proven or not
    problem: str | None = None  # why it is not `named`, when it is not

    @property
    def admin(self) -> bool:
        return self.uid == 0 and self.named is None

    def may_act_for(self, controller: str | None) -> None:
        """Refuse (403) unless this caller is root or is `controller`."""
        if self.admin or (controller is not None and self.controller == controller):
            return
        if self.problem:
            raise Forbidden(self.problem)
        if self.named is None:
            raise Forbidden(f"this request needs controller {controller}'s identity: send its name and the secret "
                            f"its lease was opened with ({CONTROLLER_HEADER}, {SECRET_HEADER}), or ask as root")
        raise Forbidden(f"controller {self.named} may not act for controller {controller}: a controller sees and "
                        "touches its own lease and VMs only")


def identify(uid: int | None, headers: Any, leases: dict[str, ControllerLease],
             retired: dict[str, ControllerLease] | None = None) -> Caller:
    """The caller behind a request: its uid, and the controller whose name and secret it sent, if they hold.
    A controller whose lease ended a little while ago (`retired`) is still itself: it may read how its VMs
    ended, and the agent refuses it anything new (host.py: no VM without an open lease)."""
    named, secret = headers.get(CONTROLLER_HEADER), headers.get(SECRET_HEADER)
    if named is None and secret is None:
        return Caller(uid)
    if named is None or secret is None:
        return Caller(uid, named=named or "?", problem=f"send both {CONTROLLER_HEADER} and {SECRET_HEADER}, or neither")
    if not CONTROLLER.fullmatch(named) or not SECRET.fullmatch(secret):
        return Caller(uid, named="?", problem=f"{CONTROLLER_HEADER} or {SECRET_HEADER} is malformed")
    lease = leases.get(named) or (retired or {}).get(named)
    if lease is None:
        return Caller(uid, named=named, problem=f"controller {named} has no lease on this host (it lapsed or was "
                      f"released): open one again (POST /v1/leases/{named})")
    if lease.secret_sha256 is None or not hmac.compare_digest(lease.secret_sha256, digest(secret)):
        return Caller(uid, named=named, problem=f"that is not controller {named}'s secret")
    if lease.uid is not None and uid != lease.uid:
        return Caller(uid, named=named, problem=f"controller {named}'s lease was opened by uid {lease.uid}, and this "
                      f"request comes from uid {uid}: a controller's secret is good for its own user only")
    return Caller(uid, controller=named, named=named)
