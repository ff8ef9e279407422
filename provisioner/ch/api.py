"""An async client for the Cloud Hypervisor REST API, on httpx, over the VMM's Unix socket.

One process runs one VM, so the client wraps the few verbs a VM's life needs, each with the state CH
requires first (docs/api.md):

    vmm.ping        any                  version check
    vm.create       no VM yet            stores the config only
    vm.boot         Created              allocates RAM, DMA-maps it for VFIO, starts vCPUs: slow, so it is
                                         bounded by what is left of the node's boot deadline, which also
                                         travels as the `X-Hearth-Deadline` header (CH's HTTP server skips
                                         headers it does not know; the stand-in logs it)
    vm.info         Created or later     state and config
    vm.power-button Running              ACPI power button: a guest without hearth's agent shuts down cleanly
Ending the process is SIGTERM's job (CH shuts down cleanly on it): see processes.terminate.

Transports are httpx's, so tests can pass `httpx.MockTransport`. Errors become `VmmApiError` (endpoint,
status and CH's error chain, which comes as a JSON array of strings), `VmmTimeout` or `VmmExited`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from provisioner.ch.spec import API_ROOT
from provisioner.errors import VmmApiError, VmmError, VmmExited, VmmTimeout

MIN_VERSION = (51, 0)  # the API we build against (spec at v53.0); Kata pins v51.1 for the same calls
DEADLINE_HEADER = "X-Hearth-Deadline"

VmState = Literal["Created", "Running", "Shutdown", "Paused", "BreakPoint"]


class VmmPing(BaseModel):
    version: str
    build_version: str | None = None
    pid: int | None = None
    features: list[str] = []

    @property
    def version_tuple(self) -> tuple[int, int]:
        match = re.search(r"(\d+)\.(\d+)", self.version)
        return (int(match[1]), int(match[2])) if match else (0, 0)


class VmInfo(BaseModel):
    state: VmState
    config: dict[str, Any]
    memory_actual_size: int | None = None


Observer = Callable[[str, str, Any], None]


class ChClient:
    """The API of one cloud-hypervisor process."""

    observers: list[Observer] = []  # called with (method, endpoint, body) for every request sent

    def __init__(self, socket_path: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 5.0) -> None:
        if transport is None:
            if socket_path is None:
                raise ValueError("ChClient needs the API socket path or a transport")
            # Plain HTTP on a Unix socket: no TLS, so no CA bundle to load (20 ms a client otherwise).
            transport = httpx.AsyncHTTPTransport(uds=socket_path, verify=False)
        self.calls = 0
        self._http = httpx.AsyncClient(transport=transport, base_url=f"http://localhost{API_ROOT}/", timeout=timeout)

    async def ping(self) -> VmmPing:
        return VmmPing.model_validate(await self._call("GET", "vmm.ping"))

    async def create(self, config: dict[str, Any]) -> None:
        await self._call("PUT", "vm.create", config)

    async def boot(self, timeout: float) -> None:
        """`timeout`: what is left of the node's boot deadline. vm.boot maps all guest RAM for VFIO: minutes
        for a TiB guest without hugepages, so no fixed cap here."""
        await self._call("PUT", "vm.boot", timeout=timeout, headers={DEADLINE_HEADER: f"{timeout:.1f}"})

    async def info(self) -> VmInfo:
        return VmInfo.model_validate(await self._call("GET", "vm.info"))

    async def power_button(self) -> None:
        await self._call("PUT", "vm.power-button")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, endpoint: str, body: Any = None, timeout: float | None = None,
                    headers: dict[str, str] | None = None) -> Any:
        for observer in self.observers:
            observer(method, endpoint, body)
        self.calls += 1
        kwargs: dict[str, Any] = {"headers": headers} if body is None else {"json": body, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http.request(method, endpoint, **kwargs)
        except httpx.TimeoutException as error:
            limit = timeout or self._http.timeout.read
            raise VmmTimeout(f"cloud-hypervisor {endpoint} did not answer within {limit:g} s") from error
        except httpx.TransportError as error:
            raise VmmExited(f"cloud-hypervisor {endpoint}: cannot reach the API socket ({error!r}); "
                            "the process has probably exited") from error
        if response.is_success:
            return response.json() if response.content else None
        raise VmmApiError(endpoint, response.status_code, _error_chain(response))


def _error_chain(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return [response.text.strip()] if response.text.strip() else []
    if isinstance(body, list):
        return [str(item) for item in body]
    return [str(body)]


def check_version(ping: VmmPing) -> None:
    if ping.version_tuple < MIN_VERSION:
        raise VmmError(f"cloud-hypervisor {ping.version} is older than v{MIN_VERSION[0]}.{MIN_VERSION[1]}, the "
                       "oldest hearth supports; install a newer release (the Ansible role pins one)")
