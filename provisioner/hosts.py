"""Where clusters may run: the hosts file (`Inventory`), one `Host` per GPU host as the controller reaches it
(its agent's socket, locally or through SSH), and the host's slice of the guest network. Validated up front:
unknown keys are refused, and every error names the field and the fix."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from provisioner.errors import SpecError, validated
from vfio.address import parse_address


class HostNetwork(BaseModel):
    """The host's slice of the cluster's guest network (docs/networking.md); its agent serves it."""

    model_config = ConfigDict(extra="forbid")
    bridge: str = "hearth0"
    subnet: ipaddress.IPv4Network | None = None
    underlay: str | None = None  # the host's own address, that other hosts route its subnet to


class Host(BaseModel):
    """A GPU host, as the controller reaches it: its agent's socket, locally or through SSH. What runs there
    (cloud-hypervisor, the host root, the bridge) is the agent's own configuration."""

    model_config = ConfigDict(extra="forbid")
    name: str
    address: str = "local"  # "local", or ssh://user@host[:port]
    agent_socket: Path = Path("/run/hearth/agent.sock")
    ssh_identity: Path | None = None  # default: the user's keys, as ssh uses them
    ssh_known_hosts: Path | None = None  # default: ~/.ssh/known_hosts; host keys are always checked
    max_concurrent_boots: int | None = None
    nvlink_cliques: list[list[str]] = []  # GPUs that share an NVLink domain; VFIO hides it from sysfs
    network: HostNetwork = HostNetwork()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value != "local" and not re.fullmatch(r"ssh://([^@/\s]+@)?[^@/:\s]+(:\d+)?", value):
            raise ValueError("address is 'local' or ssh://user@host[:port]")
        return value

    @field_validator("nvlink_cliques", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        if isinstance(value, list) and any(not isinstance(a, str) for c in value if isinstance(c, list) for a in c):
            raise ValueError('quote PCI addresses in YAML: unquoted, "0000:18:00.0" reads as a number')
        return value

    @field_validator("nvlink_cliques")
    @classmethod
    def _cliques(cls, value: list[list[str]]) -> list[list[str]]:
        return [[parse_address(a) for a in clique] for clique in value]

    @field_validator("max_concurrent_boots")
    @classmethod
    def _concurrency(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("max_concurrent_boots is at least 1 (leave it out for no limit)")
        return value


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hosts: list[Host]
    # Where the Ray head listens: an address every node can reach (for VMs, the controller's address on the
    # hosts' network; the routing the host agent sets up), not loopback.
    head_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        if not self.hosts:
            raise ValueError("list at least one host under hosts:")
        subnets = [(h.name, h.network.subnet) for h in self.hosts if h.network.subnet is not None]
        for index, (name, subnet) in enumerate(subnets):
            for other, theirs in subnets[index + 1:]:
                if subnet.overlaps(theirs):
                    raise ValueError(f"hosts {name} and {other} have overlapping subnets {subnet} and {theirs}: "
                                     "give every host its own slice of the cluster's range")
        return self


def load_inventory(path: Path) -> Inventory:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SpecError(f"hosts file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"hosts file {path} is not valid YAML: {error}") from None
    return validated(Inventory, data if isinstance(data, dict) else {"hosts": data}, f"hosts file {path}")
