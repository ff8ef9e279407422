"""hearth's exceptions. Every message names what is wrong and how to fix it.

    HearthError
    ├── HostRootError      a host path is missing or would leave the host root
    ├── SpecError          bad input: an address, a driver name, a spec field (nothing was changed)
    ├── VfioError          the host refused or failed a VFIO operation
    │   ├── BindRefused    a safety check said no before anything was written
    │   └── BindFailed     a write failed or timed out; the result says what was restored
    └── VmmError           a cloud-hypervisor process failed, refused or stopped answering
        ├── VmmApiError    the API answered with an error status (endpoint, status, CH's error chain)
        ├── VmmTimeout     a call got no answer in time
        └── VmmExited      the process ended (crash, guest poweroff) while we needed it
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class HearthError(Exception):
    """Base of every error hearth raises on purpose."""


class HostRootError(HearthError):
    pass


class SpecError(HearthError, ValueError):
    pass


class VfioError(HearthError):
    pass


class BindRefused(VfioError):
    pass


class BindFailed(VfioError):
    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result  # vfio.bind.Result: what happened to each device


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


def validated(model: type[M], data: Any, what: str) -> M:
    """`model` from `data`, or one `SpecError` that names each bad field with its fix."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in error.errors()]
        raise SpecError(f"bad {what}:\n" + "\n".join(f"  - {p}" for p in problems)) from None
