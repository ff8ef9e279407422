"""hearth's exceptions, all in one tree. Every message names what is wrong and how to fix it.

    HearthError                the root (vfio/errors.py: vfio/ is the bottom layer and owns its part)
    ├── SpecError              bad input: an address, a driver name, a spec field; nothing was changed  (vfio)
    ├── HostRootError          a host path is missing or would leave the host root                      (vfio)
    ├── VfioError              the host refused or failed a VFIO operation                              (vfio)
    │   ├── BindRefused        a safety check said no before anything was written
    │   └── BindFailed         a write failed or timed out; the result says what was restored
    ├── PlacementError         not enough free GPUs where the nodes must go; says what is free where
    ├── BootError              a cluster (or a pool's node) did not come up; nothing of it is left
    ├── NodeLost               a Pool call's node died under it; `node` and `reason` say which and why
    ├── CallTimeout            a Pool call did not finish in its `timeout` (also a TimeoutError); its task was cancelled
    ├── UnsafeDirectory        a run or state directory another user could tamper with; nothing was written there
    ├── RayError               the cluster's Ray head did not start or answer
    ├── InvalidTransition      a node state change the transition table forbids (a bug, not bad input)
    ├── NetError               a tap could not be made or set up
    ├── BuildError             `hearth guest build` failed
    ├── EnvError               the environment cannot be packed for the nodes (Python, glibc, size, mkfs)
    ├── VmmError               a VMM process failed, refused or stopped answering
    │   ├── VmmApiError        the API answered with an error status (endpoint, status, CH's error chain)
    │   ├── VmmTimeout         a call got no answer in time
    │   ├── VmmExited          the process ended (crash, guest poweroff) while we needed it
    │   └── NodeEnded          a node failed or stopped before the state it was waited for; `reason` is its own
    ├── AgentError             the host agent refuses a request; `status` is the HTTP status it answers
    │   ├── LeaseConflict      409: a GPU or VM id is taken
    │   └── VmNotFound         404: no such VM (or not that incarnation of it)
    ├── AgentRefused           the controller's side of an AgentError: the host's words and status
    └── AgentUnreachable       the controller cannot reach a host's agent (socket, SSH)
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vfio.errors import BindFailed, BindRefused, HearthError, HostRootError, SpecError, VfioError

__all__ = ["HearthError", "SpecError", "HostRootError", "VfioError", "BindRefused", "BindFailed", "PlacementError",
           "BootError", "NodeLost", "CallTimeout", "UnsafeDirectory", "RayError", "InvalidTransition", "NetError", "BuildError", "EnvError", "VmmError", "VmmApiError",
           "VmmTimeout", "VmmExited", "NodeEnded", "AgentError", "LeaseConflict", "VmNotFound", "AgentRefused",
           "AgentUnreachable", "validated"]

M = TypeVar("M", bound=BaseModel)


class PlacementError(HearthError):
    pass


class BootError(HearthError):
    pass


class NodeLost(HearthError):
    """The node a Pool call ran on died (its process or VM ended, or Ray declared it dead) before the call
    returned: raised in the caller, FLAME's way, rather than waiting for a node that will not answer."""

    def __init__(self, message: str, node: str, reason: str) -> None:
        super().__init__(message)
        self.node, self.reason = node, reason


class CallTimeout(HearthError, TimeoutError):
    pass


class UnsafeDirectory(HearthError):
    pass


class RayError(HearthError):
    pass


class InvalidTransition(HearthError):
    expected = False

    def __init__(self, node: str, old: Any, new: Any) -> None:
        super().__init__(f"node {node}: {old.value} -> {new.value} is not a valid transition")


class NetError(HearthError):
    pass


class BuildError(HearthError):
    pass


class EnvError(HearthError):
    pass


class VmmError(HearthError):
    pass


class VmmApiError(VmmError):
    def __init__(self, endpoint: str, status: int, chain: list[str]) -> None:
        self.endpoint, self.status, self.chain = endpoint, status, chain
        super().__init__(f"cloud-hypervisor {endpoint} answered {status}: {': '.join(chain) or '(no detail)'}")


class VmmTimeout(VmmError):
    pass


class VmmExited(VmmError):
    pass


class NodeEnded(VmmError):
    def __init__(self, message: str, reason: str | None) -> None:
        super().__init__(message)
        self.reason = reason  # the node's own account (the guest's words, the VMM's last log lines), if it gave one


class AgentError(HearthError):
    status = 400


class LeaseConflict(AgentError):
    status = 409


class VmNotFound(AgentError):
    status = 404


class AgentRefused(HearthError):
    """The agent refused or failed a request; its words, with the host's name."""

    def __init__(self, host: str, status: int, message: str) -> None:
        super().__init__(f"host {host}: {message}")
        self.status = status


class AgentUnreachable(HearthError):
    pass


def validated(model: type[M], data: Any, what: str) -> M:
    """`model` from `data`, or one `SpecError` that names each bad field with its fix."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in error.errors()]
        raise SpecError(f"bad {what}:\n" + "\n".join(f"  - {p}" for p in problems)) from None
