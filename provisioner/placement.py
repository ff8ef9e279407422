"""Where each node runs and which GPUs it gets: pure functions, testable without hardware.

A node with several GPUs gets them from one locality domain: one NVLink clique where the inventory names
the cliques (VFIO hides NVLink from sysfs), else one NUMA node. Within that rule a node goes to the domain
that fits it most tightly (so big nodes still find room later), and among equals to the host with most
free GPUs (so boots spread across hosts). Short capacity is an error that says what is free where; or,
from `place_what_fits`, the nodes that fit and why the others do not (a cluster with `min_nodes`).
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel

from provisioner.errors import PlacementError
from provisioner.hosts import Host


class GpuSlot(BaseModel, frozen=True):
    host: str
    address: str
    numa: int | None = None
    clique: int | None = None
    functions: list[str] = []  # the other functions of its IOMMU group, which go along

    @property
    def domain(self) -> tuple[str, str]:
        return (self.host, f"clique {self.clique}" if self.clique is not None else f"NUMA {self.numa}")


class NodePlacement(BaseModel, frozen=True):
    node_id: str
    host: str
    gpus: list[GpuSlot] = []


def host_slots(host: Host, gpus: list[dict]) -> list[GpuSlot]:
    """The slots a host's agent reports free (`GET /v1/gpus`), with the NVLink cliques the hosts file names."""
    cliques = {address: index for index, clique in enumerate(host.nvlink_cliques) for address in clique}
    return [GpuSlot(host=host.name, address=g["address"], numa=g["numa"], clique=cliques.get(g["address"]),
                    functions=g["functions"]) for g in gpus if g["leased_to"] is None]


def place(node_ids: list[str], gpus_per_node: int, hosts: list[str], free: list[GpuSlot]) -> list[NodePlacement]:
    """One placement per node id, or `PlacementError` naming what is free where."""
    placements, short = place_what_fits(node_ids, gpus_per_node, hosts, free)
    if short is not None:
        raise PlacementError(short)
    return placements


def place_what_fits(node_ids: list[str], gpus_per_node: int, hosts: list[str],
                    free: list[GpuSlot]) -> tuple[list[NodePlacement], str | None]:
    """The placements of the first node ids that fit, in order, and why the others do not (None: all fit).
    With `min_nodes`, a cluster boots what fits rather than nothing (engine.py)."""
    if gpus_per_node == 0:
        return [NodePlacement(node_id=n, host=hosts[i % len(hosts)]) for i, n in enumerate(node_ids)], None
    domains: dict[tuple[str, str], list[GpuSlot]] = defaultdict(list)
    for slot in sorted(free, key=lambda s: s.address):
        domains[slot.domain].append(slot)
    need = len(node_ids) * gpus_per_node
    short = None
    if need > len(free):
        short = (f"need {len(node_ids)} nodes x {gpus_per_node} GPUs = {need} GPUs, but only {len(free)} are free: "
                 f"{_free_text(domains)}. Ask for fewer, or bind more GPUs on the hosts "
                 "(hearth vfio bind --all-gpus --persist)")
    placements = []
    for node in node_ids:
        fitting = [d for d, slots in domains.items() if len(slots) >= gpus_per_node]
        if not fitting:
            return placements, short or (
                f"no host has {gpus_per_node} free GPUs in one NVLink clique or NUMA node for node {node} "
                f"({len(placements)} of {len(node_ids)} placed); free now: {_free_text(domains)}. Use fewer GPUs "
                "per node, or name the hosts' NVLink cliques in the hosts file")
        host_free = defaultdict(int)
        for (host, _), slots in domains.items():
            host_free[host] += len(slots)
        best = min(fitting, key=lambda d: (len(domains[d]), -host_free[d[0]], d))
        taken, domains[best] = domains[best][:gpus_per_node], domains[best][gpus_per_node:]
        placements.append(NodePlacement(node_id=node, host=best[0], gpus=taken))
    return placements, None


def _free_text(domains: dict[tuple[str, str], list[GpuSlot]]) -> str:
    by_host: dict[str, list[str]] = defaultdict(list)
    for (host, domain), slots in sorted(domains.items()):
        by_host[host].append(f"{domain}: {len(slots)}")
    if not by_host:
        return "none"
    return "; ".join(f"{host} {sum(int(p.rsplit(': ', 1)[1]) for p in parts)} ({', '.join(parts)})"
                     for host, parts in by_host.items())
