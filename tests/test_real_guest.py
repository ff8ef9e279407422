"""The Cloud Hypervisor path end to end with the real guest agent: a notebook `Cluster` through a host agent
whose VMM is cloud-hypervisor-standin (a STAND-IN: no cloud-hypervisor binary runs here), started the way a
newcomer tries the fleet path (`HEARTH_STANDIN='{"guest": "agent"}'` in the agent's environment). Each VM's
guest is guest/agent.py in its hosted mode, which runs a real `ray start` against the kernel's real head."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from test_engine import processes_mentioning

pytestmark = pytest.mark.slow

HOSTED_AGENT = {"guest": "agent", "boot_s": 0.2}


@pytest.fixture
def isolated(tmp_path, run_dir, monkeypatch):
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HEARTH_RUN_DIR", str(run_dir))


def vms_on(socket) -> list[dict]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://agent", timeout=30) as http:
        return http.get("/v1/vms").json()


def test_real_guests_join_and_outlive_host_agent_restarts(isolated, agents, tmp_path, run_dir):
    import ray

    from provisioner import Cluster

    disks_before = set(Path("/tmp").glob("hg-*"))
    host = agents.start("a", env={"HEARTH_STANDIN": json.dumps(HOSTED_AGENT)})
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(f"hosts:\n  - name: a\n    agent_socket: {host.agent_socket}\n")
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / name).write_bytes(b"\0" * 4096)

    where = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_labels()["hearth.io/node"])

    def answers(cluster) -> list[str]:
        return ray.get([where.options(label_selector={"hearth.io/node": n["id"]}).remote() for n in cluster.nodes],
                       timeout=120)

    with Cluster(nodes=2, hosts=hosts, image=image, name="real", boot_timeout=1200, show=False) as cluster:
        assert [n["state"] for n in cluster.nodes] == ["ready", "ready"]
        assert answers(cluster) == ["real-0", "real-1"]
        logs = cluster.logs("real-0")
        assert "hearth-guest: node real-0, up" in logs and "hearth-guest: ray start: the node joined in" in logs
        # the node's boot budget (boot_timeout=1200, less what placement took) bounded vm.boot on the host
        bound = re.search(r"vm\.boot: the client waits up to ([\d.]+) s", logs)
        assert bound and 1190 < float(bound[1]) <= 1200, logs
        # the guests mount the controller's environment image (hosted: its stand-in mount) before `ray start`
        assert all(set(n["guest_profile"]) == {"firmware", "kernel", "agent", "env mount", "ray start"}
                   for n in cluster.nodes), [n["guest_profile"] for n in cluster.nodes]

        for sig in (signal.SIGTERM, signal.SIGKILL):
            agents.stop("a", sig)  # the Ansible role restarts the agent on every config change
            agents.restart("a")
            time.sleep(45)
            assert [n["state"] for n in cluster.nodes] == ["ready", "ready"], (cluster.nodes, cluster.logs("real-0")[-5000:])
            assert answers(cluster) == ["real-0", "real-1"]
            vms = vms_on(host.agent_socket)
            assert sorted(v["id"] for v in vms) == ["real-0", "real-1"]
            for vm in vms:  # adopted, and the guest reconnected and said hello and ready again
                assert vm["events"][0]["detail"] == "adopted by a restarted agent"
                assert vm["state"] == "ray_joined" and vm["heard_s_ago"] < 10, vm
        assert "guest channel: connected to the host end again" in cluster.logs("real-1")
    assert not ray.is_initialized()
    disks = set(Path("/tmp").glob("hg-*")) - disks_before  # each hosted guest's own disk, gone with its VM
    assert processes_mentioning(f"{agents.vms('a')}/") == [] and not disks
    assert not any(agents.vms("a").rglob("*")) and not list((agents.state("a") / "vms").iterdir())
    assert processes_mentioning(str(run_dir / "real")) == []
