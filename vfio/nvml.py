"""What NVML says about GPUs still on the nvidia driver: name, UUID, memory, processes, persistence.

NVML only sees GPUs bound to nvidia, so it is asked before binding and sysfs is used after. It names
GPUs `00000000:3B:00.0` (eight-digit domain, upper case); `parse_address` maps that to sysfs's
`0000:3b:00.0`. No driver, no library, or a host root other than `/` (NVML describes the running
machine, not a tree) all give an unavailable report with the reason, never an exception.
"""

from __future__ import annotations

from types import ModuleType

from pydantic import BaseModel

from vfio.address import parse_address
from vfio.hostroot import HostRoot


class GpuProcess(BaseModel, frozen=True):
    pid: int
    used_memory: int | None


class NvmlGpu(BaseModel, frozen=True):
    address: str
    name: str
    uuid: str
    minor: int | None
    memory_total: int
    memory_used: int
    persistence_mode: bool
    processes: list[GpuProcess]


class NvmlReport(BaseModel, frozen=True):
    available: bool
    reason: str | None = None
    driver_version: str | None = None
    gpus: dict[str, NvmlGpu] = {}


def nvml_inventory(host: HostRoot, nvml: ModuleType | None = None) -> NvmlReport:
    """Inventory through `nvml` (the `pynvml` module from nvidia-ml-py, or a stand-in with its API)."""
    if nvml is None:
        if not host.is_live:
            return NvmlReport(available=False, reason=f"not queried: NVML describes this machine, not {host.root}")
        import pynvml as nvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return NvmlReport(available=False, reason=f"NVML unavailable ({error}): no nvidia driver on this host")
    try:
        gpus = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            gpu = _gpu(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
            gpus[gpu.address] = gpu
        return NvmlReport(available=True, driver_version=nvml.nvmlSystemGetDriverVersion(), gpus=gpus)
    except nvml.NVMLError as error:
        return NvmlReport(available=False, reason=f"NVML query failed: {error}")
    finally:
        nvml.nvmlShutdown()


def _gpu(nvml: ModuleType, handle: object) -> NvmlGpu:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    processes = [
        GpuProcess(pid=p.pid, used_memory=p.usedGpuMemory)
        for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses)
        for p in getter(handle)
    ]
    try:
        minor = nvml.nvmlDeviceGetMinorNumber(handle)
    except nvml.NVMLError:
        minor = None
    return NvmlGpu(
        address=parse_address(_str(nvml.nvmlDeviceGetPciInfo(handle).busId)),
        name=_str(nvml.nvmlDeviceGetName(handle)),
        uuid=_str(nvml.nvmlDeviceGetUUID(handle)),
        minor=minor,
        memory_total=memory.total,
        memory_used=memory.used,
        persistence_mode=nvml.nvmlDeviceGetPersistenceMode(handle) == 1,
        processes=processes,
    )


def _str(value: str | bytes) -> str:
    """Bindings before 11.515 return bytes."""
    return value.decode() if isinstance(value, bytes) else value
