"""One node contract, every backend: the same lifecycle, asserted the same way, on

    local              a `ray start` process on this machine
    qemu               a real VM (the guest image under QEMU; TCG here: /dev/kvm runs only PVM guests)
    cloud-hypervisor   cloud-hypervisor-standin (a STAND-IN: no cloud-hypervisor binary runs here) through a
                       host agent, whose guest is the real guest agent (guest/agent.py, hosted mode)

Each node joins a real Ray head; afterwards nothing of it may be left."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import QEMU_GATEWAY, QEMU_SUBNET, QEMU_TAPS
from provisioner.errors import BootError
from provisioner.events import NodeState
from provisioner.hosts import Host, HostNetwork, Inventory
from provisioner.run import ClusterRun
from provisioner.spec import cluster_spec
from test_engine import processes_mentioning

pytestmark = [pytest.mark.slow, pytest.mark.root("VMs need taps and bridges")]

LIFE = ["requested", "placed", "vmm_started", "booting", "guest_up", "ray_joined", "ready", "stopping", "stopped"]
GUEST_PHASES = {"firmware", "kernel", "agent", "env mount", "ray start"}
HOSTED_AGENT = {"guest": "agent", "boot_s": 0.2}  # the stand-in runs the real guest agent


@dataclass
class Backend:
    name: str
    run_dir: Path
    inventory: Inventory | None = None
    image: Path | None = None
    agent_vms: Path | None = None  # cloud-hypervisor: the host agent's per-VM directory
    agent_state: Path | None = None
    cluster: str = ""
    hosted_disks_before: set = field(default_factory=lambda: set(Path("/tmp").glob("hg-*")))

    @property
    def vm(self) -> bool:
        return self.name != "local"

    def run(self, **fields) -> ClusterRun:
        spec = cluster_spec(backend=self.name, image=self.image, **fields)
        self.cluster = spec.name
        return ClusterRun(spec, self.run_dir / spec.name, inventory=self.inventory)

    def leftovers(self) -> list[str]:
        cluster = self.run_dir / self.cluster
        left = processes_mentioning(f"{cluster}/")
        if self.name == "qemu":
            links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
            left += [link["ifname"] for link in links if link["ifname"].startswith(QEMU_TAPS)]
        if self.agent_vms is not None:
            left += processes_mentioning(f"{self.agent_vms}/")
            # each hosted guest's own disk (its Ray's temp dir), which the stand-in makes and removes with the VM
            disks = set(Path("/tmp").glob("hg-*")) - self.hosted_disks_before
            left += [str(d) for d in disks] + [p for d in disks for p in processes_mentioning(str(d))]
            left += [str(p) for p in self.agent_vms.rglob("*")]
            left += [str(p) for p in (self.agent_state / "vms").iterdir()]
        left += [str(p) for p in cluster.rglob("*") if p.name not in ("head.log",) and not p.is_dir()
                 and not str(p).startswith(f"{cluster}/h/")]  # the head's session files are Ray's, under h/
        return left


@pytest.fixture(params=["local", "qemu", "cloud-hypervisor"])
def backend(request, run_dir, tmp_path):
    if request.param == "local":
        return Backend("local", run_dir)
    if request.param == "qemu":
        bridge = request.getfixturevalue("qemu_bridge")
        inventory = Inventory(hosts=[Host(name="local", network=HostNetwork(bridge=bridge, subnet=QEMU_SUBNET))],
                              head_host=QEMU_GATEWAY)
        return Backend("qemu", run_dir, inventory, request.getfixturevalue("guest_image"))
    agents = request.getfixturevalue("agents")
    host = agents.start("a", env={"HEARTH_STANDIN": json.dumps(HOSTED_AGENT)})
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / name).write_bytes(b"\0" * 4096)  # the stand-in opens them; it boots none
    return Backend("cloud-hypervisor", run_dir, Inventory(hosts=[host]), image, agents.vms("a"), agents.state("a"))


def test_a_node_lives_the_same_life_on_every_backend(backend):
    run = backend.run(nodes=1, name="life", cpus=1, memory_gib=2, boot_timeout=400, labels={"team": "conformance"})

    async def scenario():
        await run.up()
        record = run.engine.nodes["life-0"]
        logs = await record.process.logs()
        alive = [n for n in await run.head.nodes() if n["state"] == "ALIVE" and "hearth.io/node" in (n["labels"] or {})]
        summary = run.summary()
        await run.down()
        return record, logs, alive, summary

    record, logs, alive, summary = asyncio.run(scenario())
    assert [e.state.value for e in record.history.events] == LIFE
    (ray_node,) = alive
    assert ray_node["node_id"] == record.ray_node_id
    assert {k: ray_node["labels"][k] for k in ("hearth.io/node", "hearth.io/cluster", "team")} == {
        "hearth.io/node": "life-0", "hearth.io/cluster": "life", "team": "conformance"}
    (node,) = summary["nodes"]
    assert set(node["profile"]) == {"placed", "vmm_started", "booting", "guest_up", "ray_joined", "ready", "total"}
    assert all(v >= 0 for v in node["profile"].values())
    if backend.vm:
        assert set(node["guest_profile"]) == GUEST_PHASES and node["guest_profile"]["ray start"] > 0
        assert "hearth-guest: ray start: the node joined in" in logs  # the guest agent's own lines
    else:
        assert node["guest_profile"] == {} and "Ray runtime started" in logs
    assert record.process.exited.is_set() and record.history.state == NodeState.stopped
    assert backend.leftovers() == []


def test_a_failing_node_fails_with_its_own_last_words(backend):
    """`ray start` cannot run (its Python cannot start): the node fails with what it printed, on its retry
    too, and the cluster with it; nothing is left."""
    run = backend.run(nodes=1, name="sick", memory_gib=2, boot_timeout=300, env={"PYTHONHOME": "/nonexistent"})
    with pytest.raises(BootError) as failed:
        asyncio.run(run.up())
    (node,) = run.summary()["nodes"]
    assert node["state"] == "stopped" and node["attempts"] == 2
    for error in node["errors"][:2]:
        prefix = "the guest agent: ray start exited with status 1: " if backend.vm else "ray start exited with status 1: "
        assert error.startswith(prefix) and "encodings" in error, error
    assert "sick-0: the guest agent: ray start" in str(failed.value) or "sick-0: ray start" in str(failed.value)
    assert backend.leftovers() == []
