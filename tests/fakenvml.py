"""A STAND-IN for the `pynvml` module (nvidia-ml-py): the calls hearth makes (the host's inventory in vfio/nvml.py,
the guest agent's reading of its GPUs in guest/agent.py), answering from a dict.

It answers in NVML's own shapes (checked against nvidia-ml-py 13.615): `busId` as `00000000:3B:00.0`
(eight-digit upper-case domain), `pciDeviceId` as (device << 16) | vendor, memory and process structs with the
same attribute names, `nvmlDeviceGetEccMode` as [current, pending], `NVMLError(value)` with NVML's error codes
(a subclass per code, as pynvml makes them) on failure, `NVML_FEATURE_ENABLED`.
"""

from __future__ import annotations

from types import SimpleNamespace

NVML_FEATURE_ENABLED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15
MESSAGES = {NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
            NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded", NVML_ERROR_GPU_IS_LOST: "GPU is lost"}


class NVMLError(Exception):
    def __init__(self, value: int | str) -> None:
        if isinstance(value, str):  # older callers of this stand-in passed the message
            value = next((code for code, text in MESSAGES.items() if text == value), 999)
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return MESSAGES.get(self.value, "Unknown Error")


class FakeNvml:
    NVMLError = NVMLError
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED

    def __init__(self, gpus: list[dict] | None = None, fail_init: bool | int = False) -> None:
        """`gpus`: dicts with address (sysfs form), name, uuid, minor, and optional processes (list of pids),
        persistence (bool), device (PCI device id, default 0x2330), memory (bytes, default 80 GiB), ecc (True,
        False, or None: not supported), persistence_error (an NVML error code SetPersistenceMode answers).
        `fail_init`: True (driver not loaded) or an NVML error code nvmlInit answers."""
        self.gpus = gpus or []
        self.fail_init = fail_init
        self.initialised = 0
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.fail_init:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED if self.fail_init is True else self.fail_init)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict:
        return self.gpus[index]

    def nvmlDeviceGetPciInfo(self, gpu: dict) -> SimpleNamespace:
        domain, bus, rest = gpu["address"].split(":")
        return SimpleNamespace(busId=f"{int(domain, 16):08X}:{bus.upper()}:{rest.upper()}",
                               pciDeviceId=(gpu.get("device", 0x2330) << 16) | 0x10DE,
                               domain=int(domain, 16), bus=int(bus, 16))

    def nvmlDeviceGetName(self, gpu: dict) -> str:
        return gpu["name"]

    def nvmlDeviceGetUUID(self, gpu: dict) -> str:
        return gpu["uuid"]

    def nvmlDeviceGetMinorNumber(self, gpu: dict) -> int:
        return gpu["minor"]

    def nvmlDeviceGetMemoryInfo(self, gpu: dict) -> SimpleNamespace:
        total = gpu.get("memory", 80 << 30)
        used = (1 << 30) if gpu.get("processes") else 0
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: dict) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in gpu.get("processes", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: dict) -> list[SimpleNamespace]:
        return []

    def nvmlDeviceGetPersistenceMode(self, gpu: dict) -> int:
        return 1 if gpu.get("persistence") else 0

    def nvmlDeviceSetPersistenceMode(self, gpu: dict, mode: int) -> None:
        self.calls.append(f"nvmlDeviceSetPersistenceMode {gpu['address']} {mode}")
        if gpu.get("persistence_error"):
            raise NVMLError(gpu["persistence_error"])
        gpu["persistence"] = mode == NVML_FEATURE_ENABLED

    def nvmlDeviceGetEccMode(self, gpu: dict) -> list[int]:
        ecc = gpu.get("ecc", True)
        if ecc is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [int(ecc), int(ecc)]
