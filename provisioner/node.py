"""What one node is asked to be: `NodeSpec`, the one request every backend and the host agent take, and
`GuestConfig`, the one message a guest agent gets over its guest channel.

The engine builds a `NodeSpec` once per boot attempt, from the cluster spec, the node's placement and the
Ray head; a backend makes the node from it, and the cloud-hypervisor backend sends it unchanged to the
node's host agent, which validates it with this same model. Whoever runs the VM (the host agent, or the qemu
backend on this machine) adds the guest's network and its patience, and sends the guest a `GuestConfig`
built by `GuestConfig.for_node`. The Ray token travels in both and nowhere else: never on a command line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vfio.address import parse_address

NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # it names sockets, taps' owners, directories and Ray labels
NODE_UID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a boot attempt's own name (the agent matches it in queries)


class GpuRequest(BaseModel):
    """One GPU a node asks its host for; the host adds the other functions of its IOMMU group."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str
    clique: int | None = None  # the NVLink clique it shares with the node's other GPUs (x_nv_gpudirect_clique)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return parse_address(value)

    @field_validator("clique")
    @classmethod
    def _clique(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 127:
            raise ValueError("an NVLink clique id is 0..127 (CH's x_nv_gpudirect_clique is an int8)")
        return value


class RayJoin(BaseModel):
    """How the node's raylet joins the cluster's head."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str  # host:port of the head's GCS
    token: str = Field(repr=False)  # RAY_AUTH_TOKEN: never logged, never on a command line
    labels: dict[str, str] = {}
    num_cpus: int = 1
    num_gpus: int = 0


class EnvImage(BaseModel):
    """The controller's environment, packed (envimage.py): every VM node mounts it read-only and runs Ray from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the image file's: how hosts keep it, and check it arrived whole
    key: str = Field(pattern=r"^[0-9a-f]{64}$")  # what is installed (its hearth-env.json): how the guest checks its disk
    interpreter: Literal["shipped", "guest"]  # whether it carries the controller's own Python
    size: int = 0


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    uid: str  # this boot attempt's own name: a retried node keeps its id, never its uid
    host: str  # the host it is placed on, by name in the hosts file
    cpus: int = 1
    memory_mib: int = 4096
    gpus: list[GpuRequest] = []
    image: Path | None = None  # the guest image directory on the host (VMs)
    ray: RayJoin
    env: dict[str, str] = {}
    env_image: EnvImage | None = None  # VMs: the environment to run Ray from (None: the guest image's own)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not NODE_ID.fullmatch(value):
            raise ValueError("a node id is up to 63 lower-case letters, digits and '-'")
        return value

    @field_validator("uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        if not NODE_UID.fullmatch(value):
            raise ValueError("a boot attempt's uid is 1 to 64 letters, digits, '_' and '-' (the engine makes one)")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: int) -> int:
        if not 1 <= value <= 254:
            raise ValueError("a node has 1 to 254 vCPUs")
        return value

    @field_validator("memory_mib")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value < 128:
            raise ValueError("give the node at least 128 MiB (Ray alone needs about 1 GiB)")
        return value


class ExpectedGpu(BaseModel):
    """A GPU the node's VM is given, as its host knows it: the guest must find one like it (count and PCI
    device id; the guest sees its own addresses, not the host's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str  # on the host
    device: str = Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")  # vendor:device, "10de:2330"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return parse_address(value)


class GuestNetwork(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str  # the guest's, with its prefix: 10.77.1.5/24
    gateway: str  # the host's bridge, where the Ray head is reached
    mac: str


class GuestConfig(BaseModel):
    """The guest agent's config, sent in answer to its hello (guest/agent.py reads it as plain JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node: str
    ray: RayJoin
    env: dict[str, str] = {}
    network: GuestNetwork | None = None
    env_image: EnvImage | None = None  # a disk with it is attached: mount it and run Ray from it
    reconnect_s: float = 30.0  # how long the guest waits for a host end that went away before it powers off
    gpus: list[ExpectedGpu] = []  # what the VM is given: the guest refuses to go on without exactly these

    @classmethod
    def for_node(cls, node: NodeSpec, *, network: GuestNetwork | None, reconnect_s: float,
                 gpus: list[ExpectedGpu] | None = None) -> GuestConfig:
        return cls(node=node.id, ray=node.ray, env=node.env, network=network, env_image=node.env_image,
                   reconnect_s=reconnect_s, gpus=gpus or [])

    def message(self) -> dict:
        """The wire form: {"op": "config", ...}, the token included (the channel is the VM's own)."""
        return {"op": "config", **self.model_dump(mode="json")}
