"""`hearth hosts check`: reach every host's agent and judge what it reports, in one table.

The agent reports facts (versions, VFIO state, GPUs and their models, NVSwitches and Fabric Manager, VMs
quarantined because their VMM outlived SIGKILL, its bridge, forwarding, routes, the env images it keeps); the
judging is done here, because only the hosts file knows the whole fleet: every host must route every other
host's subnet (docs/networking.md), and only the controller has the guest image the nodes will boot: a host
whose GPUs its driver does not support is warned of (NVIDIA's own list, which names products, not every device
the driver runs: a warning, not a refusal; guest/gpus.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from provisioner.agent.client import connect
from provisioner.errors import AgentRefused, HearthError
from provisioner.hosts import Host, Inventory


async def gather(inventory: Inventory, local_dir: Path, image: Path | None = None) -> list[dict[str, Any]]:
    """One row per host: the agent's info, or why it could not be had, plus the problems found, and warnings
    (GPUs the guest `image`'s driver does not list, NVSwitches without Fabric Manager)."""
    rows = list(await asyncio.gather(*(_one(h, inventory, local_dir) for h in inventory.hosts)))
    for row in rows:
        row["warnings"] = warnings(row["info"], image) if row["info"] is not None else []
    return rows


def warnings(info: dict[str, Any], image: Path | None) -> list[str]:
    """What may not work on this host without being a fault of the host's setup."""
    from guest.gpus import image_support

    found = []
    models = info["gpus"].get("models") or {}
    if image is not None and models and not (image / "manifest.json").is_file():
        found.append(f"{image} has no manifest.json: is it a guest image (hearth guest build)?")
    elif image is not None:
        for device, model in sorted(models.items()):
            support = image_support(image, device)
            if not support.supported:
                found.append(f"{model['count']} x {model['name']} ({device}): {support.why}")
    switches = info.get("nvswitches") or {}
    if switches.get("count") and not switches.get("shared_nvswitch"):
        found.append(switches["summary"])
    return found


async def _one(host: Host, inventory: Inventory, local_dir: Path) -> dict[str, Any]:
    try:
        client = await connect(host, local_dir)
        try:
            info = await client.info()
            try:
                envs = (await client.envs())["images"]
            except AgentRefused as error:  # an agent from before env images
                envs = None if error.status == 404 else [{"problem": str(error)}]
        finally:
            await client.aclose()
    except HearthError as error:
        return {"host": host.name, "info": None, "envs": None, "problems": [str(error)]}
    return {"host": host.name, "info": info, "envs": envs, "problems": problems(host, info, inventory)}


def problems(host: Host, info: dict[str, Any], inventory: Inventory) -> list[str]:
    found = []
    vmm = info["cloud_hypervisor"]
    if vmm.get("problem"):
        found.append(f"cloud-hypervisor: {vmm['problem']}")
    if vmm.get("standin"):
        found.append(f"cloud-hypervisor: this agent runs the STAND-IN ({vmm.get('binary')}): its VMs are simulated, "
                     "with no GPU; install cloud-hypervisor and restart the agent without --cloud-hypervisor")
    if info["vfio"]["exit_code"] >= 2:
        found += [f"vfio: {p}" for p in info["vfio"]["problems"]]
    if info["gpus"]["usable"] == 0:
        found.append("no GPU is ready for VMs (hearth vfio check on the host says why)")
    for stuck in info.get("quarantined") or []:  # agents from before quarantine do not say
        kept = ", ".join([*stuck["gpus"], *(x for x in (stuck["tap"], stuck["address"]) if x)]) or "nothing"
        found.append(f"quarantined: VM {stuck['vm']} keeps {kept}: {stuck['why']}")
    network = info["network"]
    subnet = host.network.subnet
    if subnet is None:
        return found
    bridge = network.get("bridge")
    gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    if network.get("subnet") != str(subnet):
        found.append(f"the agent serves subnet {network.get('subnet')}, the hosts file says {subnet}")
    if not bridge or not bridge["exists"]:
        found.append(f"bridge {host.network.bridge} is missing")
    else:
        if not bridge["up"]:
            found.append(f"bridge {bridge['name']} is down")
        if gateway not in bridge["addresses"]:
            found.append(f"bridge {bridge['name']} lacks the guests' gateway address {gateway}")
    if not network["forwarding"]:
        found.append("IPv4 forwarding is off (net.ipv4.ip_forward=1)")
    routes = [ipaddress.ip_network(r) for r in network["routes"] if r != "default"]
    for other in inventory.hosts:
        theirs = other.network.subnet
        if other.name != host.name and theirs is not None and not any(r.supernet_of(theirs) for r in routes):
            found.append(f"no route to {other.name}'s guests ({theirs}"
                         + (f" via {other.network.underlay})" if other.network.underlay else ")"))
    return found


def table(rows: list[dict[str, Any]]) -> Table:
    grid = Table(title="hearth hosts", title_justify="left")
    for column in ("host", "agent", "GPUs free", "cloud-hypervisor", "VFIO", "network", "env images", "problems"):
        grid.add_column(column, overflow="fold")
    for row in rows:
        info = row["info"]
        problems_text = "\n".join([*row["problems"], *(f"[yellow]warning: {escape(w)}[/]" for w in row.get("warnings", []))]) \
            or "[green]none[/]"
        if info is None:
            grid.add_row(row["host"], "[red]unreachable[/]", "", "", "", "", "", problems_text)
            continue
        vmm = info["cloud_hypervisor"]
        vfio = {0: "[green]ready[/]", 1: "[yellow]warnings[/]"}.get(info["vfio"]["exit_code"], "[red]errors[/]")
        network = info["network"]
        bridge = network.get("bridge")
        net = (f"{bridge['name']} {'up' if bridge['up'] else 'down'} {network['subnet']}" if bridge and bridge["exists"]
               else "no bridge") + (", forwarding" if network["forwarding"] else ", no forwarding")
        grid.add_row(row["host"], info["agent"], f"{info['gpus']['free']}/{info['gpus']['usable']}",
                     (vmm.get("version") or "missing") + (" (stand-in)" if vmm.get("standin") else ""),
                     f"{vfio} ({info['vfio']['gpus']} GPUs)", net, _envs(row.get("envs")), problems_text)
    return grid


def _envs(images: list[dict[str, Any]] | None) -> str:
    """Each env image on the host: its sha256 prefix and size (and how much has arrived, when partial)."""
    if images is None:
        return "[dim]unknown[/]"
    lines = []
    for image in images:
        if "problem" in image:
            lines.append(f"[red]{image['problem']}[/]")
        elif image["complete"]:
            lines.append(f"{image['sha256'][:12]} {_mib(image['size'])}")
        else:
            lines.append(f"{image['sha256'][:12]} {_mib(image['received'])} of {_mib(image['size'])} (partial)")
    return "\n".join(lines) or "none"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"
