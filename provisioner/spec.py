"""What a user asks for (`ClusterSpec`), validated up front: unknown keys are refused, and every error names
the field and the fix, before anything starts. Where it may run is the hosts file (hosts.py)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from provisioner.errors import validated

Backend = Literal["local", "cloud-hypervisor", "qemu"]
_LABEL_KEY = re.compile(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
RESERVED_LABEL_PREFIXES = ("hearth.io/", "ray.io/")
MAX_BOOT_TIMEOUT = 86400.0  # what a host agent accepts as a boot's budget


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: int = 2
    gpus_per_node: int = 0
    gpu_type: str | None = None
    cpus: int = 1
    memory_gib: int = 4
    image: Path | None = None  # the guest image directory on the hosts (vmlinuz, initrd.img, rootfs.img); VMs only
    boot_timeout: float = 300.0
    min_nodes: int | None = None  # default: all of them
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    backend: Backend = "local"
    name: str = ""
    # VM backends: pack the controller's Python environment and run every node's Ray from it (envimage.py);
    # False: the guest image's own (Ray alone, nothing else the notebook imports)
    pack_env: bool = True

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: int) -> int:
        if not 0 <= value <= 1024:
            raise ValueError("ask for 0 to 1024 nodes (0: a head only, for a Pool to grow)")
        return value

    @field_validator("gpus_per_node")
    @classmethod
    def _gpus(cls, value: int) -> int:
        if not 0 <= value <= 16:
            raise ValueError("a node has 0 to 16 GPUs (an HGX host has 8)")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: int) -> int:
        if not 1 <= value <= 254:
            raise ValueError("a node has 1 to 254 CPUs")
        return value

    @field_validator("memory_gib")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value < 1:
            raise ValueError("give each node at least 1 GiB (Ray needs about that)")
        return value

    @field_validator("boot_timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0 < value <= MAX_BOOT_TIMEOUT:  # NaN fails this too
            raise ValueError(f"boot_timeout is in seconds, more than 0 and at most {MAX_BOOT_TIMEOUT:g} (a day): "
                             "a node that is not up by then will not be")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if not _LABEL_KEY.fullmatch(key):
                raise ValueError(f"label key {key!r} is not valid: use [prefix/]name of letters, digits, '-', '_', '.'")
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"label key {key!r} uses a reserved prefix ({', '.join(RESERVED_LABEL_PREFIXES)}): "
                                 "hearth sets those itself")
            if not _LABEL_VALUE.fullmatch(label):
                raise ValueError(f"label {key}={label!r}: values are up to 63 letters, digits, '-', '_', '.'")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"env name {key!r} is not a valid environment variable name")
            if key.startswith("RAY_AUTH"):
                raise ValueError(f"env {key}: hearth sets Ray's authentication itself")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = value or f"hearth-{secrets.token_hex(3)}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,23}", value):
            raise ValueError("use up to 24 lower-case letters, digits and '-' (it names nodes and sockets)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        if self.min_nodes is not None and not 0 <= self.min_nodes <= self.nodes:
            raise ValueError(f"min_nodes must be between 0 and nodes ({self.nodes})")
        if self.backend == "qemu" and self.gpus_per_node:
            raise ValueError("the qemu backend passes no GPUs through: use cloud-hypervisor for GPU nodes")
        if self.backend in ("cloud-hypervisor", "qemu"):
            if self.image is None:
                raise ValueError(f"the {self.backend} backend needs image= (a directory with vmlinuz, initrd.img, "
                                 "rootfs.img; `hearth guest build` makes one)")
        return self

    @property
    def required_nodes(self) -> int:
        return self.min_nodes or self.nodes

    def node_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.nodes)]


def default_backend(backend: str | None, hosts: object) -> str:
    """The backend a user meant: the one named, else cloud-hypervisor with a hosts file, else local."""
    return backend or ("cloud-hypervisor" if hosts else "local")


def cluster_spec(**fields) -> ClusterSpec:
    return validated(ClusterSpec, fields, "cluster spec")
