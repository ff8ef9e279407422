"""A STAND-IN for the `pynvml` module (nvidia-ml-py): the calls hearth makes, answering from a dict.

It answers in NVML's own shapes: `busId` as `00000000:3B:00.0` (eight-digit upper-case domain), memory
and process structs with the same attribute names, `NVMLError` on failure.
"""

from __future__ import annotations

from types import SimpleNamespace


class NVMLError(Exception):
    pass


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, gpus: list[dict] | None = None, fail_init: bool = False) -> None:
        """`gpus`: dicts with address (sysfs form), name, uuid, minor, and optional processes
        (list of pids), persistence (bool)."""
        self.gpus = gpus or []
        self.fail_init = fail_init
        self.initialised = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict:
        return self.gpus[index]

    def nvmlDeviceGetPciInfo(self, gpu: dict) -> SimpleNamespace:
        domain, bus, rest = gpu["address"].split(":")
        return SimpleNamespace(busId=f"{int(domain, 16):08X}:{bus.upper()}:{rest.upper()}")

    def nvmlDeviceGetName(self, gpu: dict) -> str:
        return gpu["name"]

    def nvmlDeviceGetUUID(self, gpu: dict) -> str:
        return gpu["uuid"]

    def nvmlDeviceGetMinorNumber(self, gpu: dict) -> int:
        return gpu["minor"]

    def nvmlDeviceGetMemoryInfo(self, gpu: dict) -> SimpleNamespace:
        return SimpleNamespace(total=80 << 30, used=(1 << 30) if gpu.get("processes") else 0, free=0)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: dict) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in gpu.get("processes", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: dict) -> list[SimpleNamespace]:
        return []

    def nvmlDeviceGetPersistenceMode(self, gpu: dict) -> int:
        return 1 if gpu.get("persistence") else 0
