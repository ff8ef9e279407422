"""Host agents driving a fleet: two agents on this machine, each with its own 8-GPU host tree, socket, state
directory, bridge and subnet, on the cloud-hypervisor STAND-IN (no real VMM runs here). One is reached
through its socket, the other through a real OpenSSH server on loopback (Debian's sshd, started here with
generated keys), the way a remote GPU host is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import temporary_bridge
from hosts import HGX_GPUS, hgx_h100
from hosttree import FakeKernel
from provisioner.run import ClusterRun
from provisioner.errors import BootError
from provisioner.net import tap_exists
from provisioner.errors import PlacementError
from provisioner.spec import cluster_spec
from provisioner.hosts import HostNetwork, Inventory
from test_engine import processes_mentioning
from vfio.bind import apply, plan_bind
from vfio.hostroot import HostRoot

pytestmark = [pytest.mark.slow, pytest.mark.root("agents make taps and bridges")]
STANDIN_GUEST = {"boot_s": 0.3, "guest": "builtin", "join_s": 0.1}


@pytest.fixture
def fleet(tmp_path, agents, sshd):
    """Two GPU hosts: `a` (local socket) and `b` (through SSH), 8 H100s each on vfio-pci, a bridge each."""
    tag = f"{os.getpid() % 10000:04d}"
    hosts = []
    with contextlib.ExitStack() as bridges:
        for index, name in enumerate(("a", "b"), start=1):
            root = tmp_path / f"host-{name}"
            tree = hgx_h100(root)
            with FakeKernel(tree):
                apply(HostRoot(root), plan_bind(HostRoot(root), HGX_GPUS, nvml=None))
            (root / "proc/sys/net/ipv4").mkdir(parents=True)
            (root / "proc/sys/net/ipv4/ip_forward").write_text("1\n")
            subnet = f"10.251.{index}.0/24"
            bridge = bridges.enter_context(temporary_bridge(f"hbr{tag}{name}", f"10.251.{index}.1/24"))
            host = agents.start(name, root=root, bridge=bridge, subnet=subnet)
            network = HostNetwork(bridge=bridge, subnet=subnet)
            if name == "b":
                host = host.model_copy(update={"address": sshd["address"], "ssh_identity": sshd["identity"],
                                               "ssh_known_hosts": sshd["known_hosts"]})
            hosts.append(host.model_copy(update={"network": network, "nvlink_cliques": [HGX_GPUS]}))
        image = tmp_path / "image"
        image.mkdir()
        for part in ("vmlinuz", "initrd.img", "rootfs.img"):
            (image / part).write_bytes(b"\0" * 4096)
        yield Inventory(hosts=hosts), image



def _run(spec_fields, inventory, image, run_dir, **options) -> ClusterRun:
    spec = cluster_spec(backend="cloud-hypervisor", image=image, **spec_fields)
    return ClusterRun(spec, run_dir / spec.name, inventory=inventory, with_ray=False,
                      standin=options.pop("standin", lambda node: STANDIN_GUEST), **options)


def never_leased_twice(state_dir: Path) -> dict[str, str]:
    """Replay an agent's audit log: no device is leased while leased; returns what is still held."""
    held: dict[str, str] = {}
    for line in (state_dir / "leases.log").read_text().splitlines():
        entry = json.loads(line)
        for device in entry.get("devices", []) if entry["op"] in ("lease", "release") else []:
            if entry["op"] == "lease":
                assert device not in held, f"{device} leased to {entry['subject']} while {held[device]} held it"
                held[device] = entry["subject"]
            else:
                assert held.pop(device) == entry["subject"]
    return held


def assert_nothing_left(agents, *names: str) -> None:
    for name in names:
        vms = agents.vms(name)
        assert processes_mentioning(f"{vms}/") == [], f"VMMs left on {name}"
        assert not any(vms.rglob("*")), f"files left under {vms}: {list(vms.rglob('*'))}"
        assert list((agents.state(name) / "vms").iterdir()) == [], f"leases left on {name}"
        assert never_leased_twice(agents.state(name)) == {}
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    # the fleet's taps: hth + the guest address in hex, 10.251.x.y (other runs on this machine have their own subnets)
    assert not [link["ifname"] for link in json.loads(links) if link["ifname"].startswith("hth0afb")], "taps left"


def agent_http(socket_path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://agent", timeout=30)


def test_16_nodes_across_a_local_and_an_ssh_host(fleet, agents, run_dir):
    inventory, image = fleet
    run = _run({"nodes": 16, "gpus_per_node": 1, "gpu_type": "H100", "name": "fleet", "boot_timeout": 60},
               inventory, image, run_dir)

    async def scenario():
        await run.up()
        summary = run.summary()
        forwarded = list((run_dir / "fleet" / "agents").glob("*.sock"))
        vms = {name: agent_http(agents.vms(name).parent / f"{name}.sock").get("/v1/vms").json() for name in "ab"}
        await run.down()
        return summary, forwarded, vms

    summary, forwarded, vms = asyncio.run(scenario())
    assert [n["state"] for n in summary["nodes"]] == ["ready"] * 16
    assert sorted(n["host"] for n in summary["nodes"]) == ["a"] * 8 + ["b"] * 8
    assert [p.name for p in forwarded] == ["b.sock"]  # b is reached through the SSH forward
    for index, name in enumerate("ab", start=1):
        assert len(vms[name]) == 8
        addresses = {vm["address"] for vm in vms[name]}
        assert len(addresses) == 8 and all(a.startswith(f"10.251.{index}.") for a in addresses)
        assert all(vm["state"] == "ray_joined" and vm["tap"].startswith("hth") for vm in vms[name])
        assert all(vm["heard_s_ago"] is not None and vm["heard_s_ago"] < 5 for vm in vms[name])  # heartbeats
        assert sorted(g for vm in vms[name] for g in vm["gpus"]) == sorted(HGX_GPUS)
    assert "Accepted publickey" in Path(inventory.hosts[1].ssh_known_hosts).with_name("sshd.log").read_text()
    assert all(n["state"] == "stopped" for n in run.summary()["nodes"])
    assert_nothing_left(agents, "a", "b")
    assert not (run_dir / "fleet" / "agents" / "b.sock").exists()


def test_taps_sit_on_the_bridge_and_guests_get_addresses(fleet, agents, run_dir):
    inventory, image = fleet
    local = Inventory(hosts=[inventory.hosts[0]])
    run = _run({"nodes": 2, "gpus_per_node": 1, "name": "net"}, local, image, run_dir)

    async def scenario():
        await run.up()
        vms = agent_http(agents.vms("a").parent / "a.sock").get("/v1/vms").json()
        masters = {vm["tap"]: os.path.basename(os.readlink(f"/sys/class/net/{vm['tap']}/master")) for vm in vms}
        await run.down()
        return vms, masters

    vms, masters = asyncio.run(scenario())
    assert set(masters.values()) == {inventory.hosts[0].network.bridge}
    assert sorted(vm["address"] for vm in vms) == ["10.251.1.2/24", "10.251.1.3/24"]
    assert not any(tap_exists(tap) for tap in masters)


def test_hosts_check_reports_every_host_in_one_table(fleet, agents, run_dir, tmp_path):
    inventory, _ = fleet
    hosts_file = tmp_path / "hosts.yaml"
    hosts_file.write_text(json.dumps(json.loads(inventory.model_dump_json())))
    env = {**os.environ, "COLUMNS": "250"}
    hearth = str(Path(sys.executable).with_name("hearth"))
    check = subprocess.run([hearth, "hosts", "check", "--hosts", str(hosts_file)], capture_output=True, text=True,
                           env=env, timeout=60)
    for text in ("0.1.0", "8/8", "v53.0 (stand-in)", inventory.hosts[0].network.bridge, "forwarding"):
        assert text in check.stdout
    # these agents run the stand-in: that alone is flagged, on every host
    assert check.returncode == 1 and check.stdout.count("runs the STAND-IN") == 2, check.stdout + check.stderr
    good = json.loads(subprocess.run([hearth, "hosts", "check", "--hosts", str(hosts_file), "--json"],
                                     capture_output=True, text=True, env=env, timeout=60).stdout)
    assert all(len(r["problems"]) == 1 and "STAND-IN" in r["problems"][0] for r in good), good
    # warned of, not a problem: the NVSwitches need Fabric Manager; the image's driver does not list the H100s
    image = tmp_path / "nvidia-image"
    image.mkdir()
    (image / "manifest.json").write_text(json.dumps({"inputs": {"nvidia": {"driver": "535.261.03", "modules": "open"}}}))
    (image / "supported-gpus.json").write_text(json.dumps({"chips": [{"devid": "0x26B9", "name": "NVIDIA L40S",
                                                                       "features": ["kernelopen"]}]}))
    warned = subprocess.run([hearth, "hosts", "check", "--hosts", str(hosts_file), "--image", str(image), "--json"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert warned.returncode == 1 and [r["problems"] for r in json.loads(warned.stdout)] == [r["problems"] for r in good]
    for row in json.loads(warned.stdout):
        assert row["warnings"] == [
            "8 x GH100 [H100 SXM5 80GB] (10de:2330): NVIDIA's list for 535.261.03 does not name device 0x2330",
            "NVSwitches: 4 stay with the host (VMs get GPUs only); Fabric Manager is not installed on this host "
            "(NVLink between a VM's GPUs needs it running with FABRIC_MODE=1)"], row
    (tmp_path / "host-b/proc/sys/net/ipv4/ip_forward").write_text("0\n")
    hosts_file.write_text(hosts_file.read_text().replace("10.251.2.0/24", "10.252.2.0/24"))
    bad = subprocess.run([hearth, "hosts", "check", "--hosts", str(hosts_file), "--json"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 1
    rows = {r["host"]: r["problems"] for r in json.loads(bad.stdout)}
    assert "IPv4 forwarding is off (net.ipv4.ip_forward=1)" in rows["b"]
    assert "the agent serves subnet 10.251.2.0/24, the hosts file says 10.252.2.0/24" in rows["b"]
    assert any(p.startswith("no route to b's guests (10.252.2.0/24") for p in rows["a"])


def test_an_agent_killed_mid_boot_is_restarted_and_the_cluster_comes_up(fleet, agents, run_dir):
    inventory, image = fleet
    host_a = inventory.hosts[0]
    local = Inventory(hosts=[host_a])
    slow = {"boot_s": 3.0, "guest": "builtin"}
    run = _run({"nodes": 2, "gpus_per_node": 2, "name": "restart", "boot_timeout": 90}, local, image, run_dir,
               standin=lambda node: slow if node.endswith(("-2", "-3")) else STANDIN_GUEST)

    async def scenario():
        await run.up()  # two nodes boot fully: the restarted agent must adopt them
        first = {r.node_id: r.ray_node_id for r in run.engine.nodes.values()}
        growing = asyncio.create_task(run.scale(4))
        deadline = time.monotonic() + 60
        new = [f"{agents.vms('a')}/restart-{i}/" for i in (2, 3)]
        while not all(processes_mentioning(vm) for vm in new):  # leased, VMM started: in vm.boot for 3 s
            assert time.monotonic() < deadline and not growing.done(), "the new two's VMMs did not start"
            await asyncio.sleep(0.05)
        agents.stop("a", signal.SIGKILL)
        await asyncio.sleep(1.0)
        agents.restart("a")
        await growing
        summary = run.summary()
        vms = agent_http(host_a.agent_socket).get("/v1/vms").json()
        await run.down()
        return first, summary, vms

    first, summary, vms = asyncio.run(scenario())
    states = {n["id"]: n["state"] for n in summary["nodes"]}
    assert states == {f"restart-{i}": "ready" for i in range(4)}
    assert {v["id"] for v in vms} == set(states)
    adopted = [v for v in vms if v["events"][0]["detail"] == "adopted by a restarted agent"]
    assert sorted(v["id"] for v in adopted) == sorted(first)
    log = [json.loads(line) for line in (agents.state("a") / "leases.log").read_text().splitlines()]
    for node in ("restart-2", "restart-3"):  # caught mid-boot: removed by the new agent, then booted again
        ops = [(e["op"], e.get("why", "")) for e in log if e["subject"] == node]
        assert ops[0][0] == "lease" and ops[1][0] == "release" and ops[1][1].startswith("agent restart: ")
        assert ops[2] == ("lease", "")
    assert_nothing_left(agents, "a")


def test_two_clusters_contend_for_the_same_gpus(fleet, agents, run_dir):
    """Two notebooks ask for 10 one-GPU nodes each from the same 16 GPUs, at once. Whoever looks second may
    find fewer free (a PlacementError, before anything starts) or lose a race for a GPU at the agent (409,
    retried elsewhere); never may a GPU be leased twice, and nothing may be left."""
    inventory, image = fleet
    runs = [_run({"nodes": 10, "gpus_per_node": 1, "name": name, "min_nodes": 1, "boot_timeout": 60},
                 inventory, image, run_dir) for name in ("left", "right")]

    async def scenario():
        outcomes = await asyncio.gather(*(r.up() for r in runs), return_exceptions=True)
        summaries = [r.summary() for r in runs]
        await asyncio.gather(*(r.down() for r in runs))
        return outcomes, summaries

    outcomes, summaries = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, (PlacementError, BootError)) and "free" in str(o) for o in refused), refused
    assert len(refused) < 2  # one of them got GPUs
    ready = [sum(n["state"] == "ready" for n in s["nodes"]) for s in summaries]
    assert 10 <= sum(ready) <= 16, ready
    assert_nothing_left(agents, "a", "b")


def test_a_controller_that_stops_renewing_loses_its_vms(fleet, agents, run_dir):
    inventory, image = fleet
    run = _run({"nodes": 8, "gpus_per_node": 2, "name": "orphan"}, inventory, image, run_dir, lease_s=2.0)

    async def scenario():
        await run.up()
        run.backend.stop_renewing()  # as when the notebook's kernel dies or the network splits
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(r.process.exited.wait() for r in run.engine.nodes.values())), 30)
        reaped_after = time.monotonic() - started
        summary = run.summary()
        await run.down()
        return reaped_after, summary

    reaped_after, summary = asyncio.run(scenario())
    assert reaped_after < 2.0 + 1.0 + 5.0  # the lease, the reaper's interval, the stop
    assert all(n["state"] == "stopped" for n in summary["nodes"])
    for name in "ab":
        assert "its controller's lease expired" in (agents.state(name) / "leases.log").read_text()
    assert_nothing_left(agents, "a", "b")


def test_bad_requests_are_refused_before_anything_is_made(tmp_path, agents, run_dir):
    root = tmp_path / "host"
    tree = hgx_h100(root)
    with FakeKernel(tree):
        apply(HostRoot(root), plan_bind(HostRoot(root), HGX_GPUS[:6], nvml=None))
    host = agents.start("solo", root=root)
    mode = os.stat(host.agent_socket).st_mode
    assert stat.S_IMODE(mode) == 0o660 and stat.S_ISSOCK(mode)
    image = tmp_path / "image"
    image.mkdir()
    for part in ("vmlinuz", "rootfs.img"):
        (image / part).write_bytes(b"\0" * 4096)
    http = agent_http(host.agent_socket)
    gpus = http.get("/v1/gpus").json()
    assert [g["address"] for g in gpus] == sorted(HGX_GPUS[:6]) and [g["numa"] for g in gpus] == [0, 0, 0, 0, 1, 1]
    def body(controller="c1", uid="u1", **node):
        node = {"id": "n-0", "uid": uid, "host": "solo", "image": str(image),
                "ray": {"address": "127.0.0.1:1", "token": "not-a-secret"}, **node}
        return {"controller": controller, "budget_s": 30, "node": node, "standin": STANDIN_GUEST}

    cases = [
        (body(gpus=[{"address": HGX_GPUS[7]}]), 400, "is on nvidia, not vfio-pci (hearth vfio bind 0000:db:00.0"),
        (body(gpus=[{"address": "0000:77:00.0"}]), 400, "0000:77:00.0 is not a GPU on this host"),
        (body(image=str(tmp_path)), 400, "kernel: " + str(tmp_path / "vmlinuz") + " is not a file"),
        (body(cpus=0), 400, "node.cpus: a node has 1 to 254 vCPUs"),
        ({**body(), "speed": "fast"}, 400, "speed: Extra inputs are not permitted"),
        (body(id="n-9"), 400, "the VM id in the path (n-0) is not the node's id (n-9)"),
    ]
    for request, status, words in cases:
        response = http.put("/v1/vms/n-0", json=request)
        assert response.status_code == status and words in response.json()["error"], response.text
    for path, words in (("/v1/vms/..%2Fetc", "is not a VM id"), ("/v1/vms/n-0?after=1&wait=nan", "give a number of seconds from 0 to 60")):
        response = http.get(path)
        assert response.status_code == 400 and words in response.json()["error"], response.text
    assert not agents.vms("solo").exists() or not any(agents.vms("solo").iterdir())
    assert not (agents.state("solo") / "leases.log").exists()
    ok = http.put("/v1/vms/n-0", json=body(gpus=[{"address": HGX_GPUS[0]}]))
    assert ok.status_code == 201
    assert http.put("/v1/vms/n-0", json=body(gpus=[{"address": HGX_GPUS[0]}])).status_code == 201  # idempotent
    taken = http.put("/v1/vms/n-1", json=body("c2", "u2", id="n-1", gpus=[{"address": HGX_GPUS[0]}]))
    assert taken.status_code == 409 and "GPU 0000:18:00.0 is leased to VM n-0" in taken.json()["error"]
    assert [g["leased_to"] for g in http.get("/v1/gpus").json()][:2] == ["n-0", None]
    with pytest.raises(Exception, match="another hearth agent"):
        agents.start("solo", root=root)
    assert http.delete("/v1/leases/c1").status_code == 200
    assert http.get("/v1/vms/n-0").json()["state"] == "stopped"
    assert_nothing_left(agents, "solo")


@pytest.mark.requires("systemd-analyze")
def test_agent_unit_is_valid_and_keeps_vms_across_restarts(tmp_path):
    unit = (Path(__file__).parents[1] / "provisioner/agent/hearth-agent.service").read_text()
    assert "KillMode=process\n" in unit and "RuntimeDirectoryPreserve=yes\n" in unit
    copy = tmp_path / "hearth-agent.service"
    copy.write_text(unit.replace("/usr/local/bin/hearth", str(Path(sys.executable).with_name("hearth"))))
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def as_user(uid: int, socket_path: Path, method: str, path: str, headers: dict[str, str] | None = None,
            body: dict | None = None) -> tuple[int, dict]:
    """One request to an agent from a process running as `uid` (a fork that drops root, so the agent's
    SO_PEERCRED sees that uid), over plain HTTP/1.1."""
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, ask, hand the raw answer back, and leave without cleaning up
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(socket_path))
                sock.sendall(head.encode() + data)
                while chunk := sock.recv(65536):
                    os.write(write, chunk)
        except BaseException as error:  # noqa: BLE001
            os.write(write, f"HTTP/1.1 599 child\r\n\r\n{json.dumps({'error': repr(error)})}".encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = b""
    while chunk := os.read(read, 65536):
        answer += chunk
    os.close(read)
    os.waitpid(pid, 0)
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")


def test_controllers_see_and_touch_only_their_own(tmp_path, agents, run_dir):
    """Two controllers, one a local user (nobody) and one root, each with the secret its lease was opened with;
    a caller without it; root without one (an admin). Only its own, and 403 naming what is missing."""
    root = tmp_path / "host"
    hgx_h100(root, gpu_driver="vfio-pci")
    host = agents.start("ids", root=root)
    run_dir.chmod(0o711)  # nobody may reach the socket: its group is nobody's here, as `hearth` is on a host
    os.chown(host.agent_socket, -1, 65534)
    sock, nobody = host.agent_socket, 65534
    image = tmp_path / "image"
    image.mkdir()
    for part in ("vmlinuz", "rootfs.img"):
        (image / part).write_bytes(b"\0" * 4096)

    def vm(controller: str, vm_id: str, gpu: str) -> dict:
        node = {"id": vm_id, "uid": "u1", "host": "ids", "image": str(image), "gpus": [{"address": gpu}],
                "ray": {"address": "127.0.0.1:1", "token": "not-a-secret"}}
        return {"controller": controller, "budget_s": 30, "node": node, "standin": STANDIN_GUEST}

    status, bob = as_user(nobody, sock, "POST", "/v1/leases/bob?ttl=60")
    assert status == 200 and len(bob["secret"]) >= 32 and bob["expires_in"] > 50
    as_bob = {"X-Hearth-Controller": "bob", "X-Hearth-Secret": bob["secret"]}
    http = agent_http(sock)
    carol = http.post("/v1/leases/carol", params={"ttl": 60}).json()
    as_carol = {"X-Hearth-Controller": "carol", "X-Hearth-Secret": carol["secret"]}
    assert http.post("/v1/leases/carol", params={"ttl": 60}, headers=as_carol).json().get("secret") is None  # once
    assert as_user(nobody, sock, "PUT", "/v1/vms/bob-0", as_bob, vm("bob", "bob-0", HGX_GPUS[0]))[0] == 201
    assert http.put("/v1/vms/carol-0", json=vm("carol", "carol-0", HGX_GPUS[1]), headers=as_carol).status_code == 201

    refused = [  # (uid, method, path, headers, body, words)
        (nobody, "GET", "/v1/vms", {}, None, "needs controller None's identity"),
        (nobody, "GET", "/v1/vms/carol-0", {}, None, "needs controller carol's identity"),
        (nobody, "DELETE", "/v1/vms/carol-0", {}, None, "needs controller carol's identity"),
        (nobody, "POST", "/v1/leases/carol?ttl=60", {}, None, "needs controller carol's identity"),
        (nobody, "DELETE", "/v1/leases/carol", {}, None, "needs controller carol's identity"),
        (nobody, "GET", "/v1/vms/carol-0", as_bob, None, "controller bob may not act for controller carol"),
        (nobody, "GET", "/v1/vms/carol-0/logs", as_bob, None, "controller bob may not act for controller carol"),
        (nobody, "DELETE", "/v1/leases/carol", as_bob, None, "controller bob may not act for controller carol"),
        (nobody, "PUT", "/v1/vms/bob-1", as_bob, vm("carol", "bob-1", HGX_GPUS[2]), "may not act for controller carol"),
        (nobody, "GET", "/v1/vms/carol-0", as_carol, None, "opened by uid 0, and this request comes from uid 65534"),
        (0, "GET", "/v1/vms/bob-0", as_carol, None, "controller carol may not act for controller bob"),
        (0, "GET", "/v1/vms/bob-0", {**as_bob, "X-Hearth-Secret": "x" * 43}, None, "that is not controller bob's secret"),
        (0, "GET", "/v1/vms/bob-0", {"X-Hearth-Controller": "bob"}, None, "send both X-Hearth-Controller and"),
    ]
    for uid, method, path, headers, body, words in refused:
        status, answer = as_user(uid, sock, method, path, headers, body)
        assert status == 403 and words in answer["error"], (method, path, status, answer)
    assert [v["id"] for v in as_user(nobody, sock, "GET", "/v1/vms", as_bob)[1]] == ["bob-0"]
    assert [v["id"] for v in http.get("/v1/vms", headers=as_carol).json()] == ["carol-0"]
    assert sorted(v["id"] for v in http.get("/v1/vms").json()) == ["bob-0", "carol-0"]  # root: all
    assert as_user(nobody, sock, "GET", "/v1/gpus")[0] == 200  # the inventory is anyone's
    # the agent keeps the secrets' digests only, in a file only root reads, and logs neither
    controllers = agents.state("ids") / "controllers.json"
    assert stat.S_IMODE(controllers.stat().st_mode) == 0o600
    kept = controllers.read_text()
    assert json.loads(kept)["bob"]["uid"] == nobody and json.loads(kept)["carol"]["uid"] == 0
    for secret in (bob["secret"], carol["secret"]):
        for path in agents.state("ids").rglob("*"):
            assert not path.is_file() or secret not in path.read_text(errors="replace"), path
        assert secret not in Path(tmp_path / "agent-ids.log").read_text()
    assert as_user(nobody, sock, "DELETE", "/v1/leases/bob", as_bob)[0] == 200
    assert as_user(nobody, sock, "GET", "/v1/vms/bob-0", as_bob)[1]["state"] == "stopped"  # it may see how it ended
    assert http.delete("/v1/leases/carol").status_code == 200  # root may end anyone's
    assert_nothing_left(agents, "ids")


def test_housekeeping_survives_an_error_and_still_reaps(tmp_path, capfd):
    """The reaper's round fails (here: its first look at the leases raises); it says so, and the next round
    ends the lapsed lease all the same."""
    from conftest import STANDIN
    from provisioner.agent.auth import Caller
    from provisioner.agent.host import AgentConfig, HostAgent

    async def scenario():
        agent = HostAgent(AgentConfig(state_dir=tmp_path / "state", run_dir=tmp_path / "vms", host_root=tmp_path,
                                      cloud_hypervisor=STANDIN))
        expired, calls = agent.ledger.expired, []

        def flaky() -> list[str]:
            calls.append(1)
            if len(calls) == 2:  # the first round's (the one at start is the recovery's)
                raise RuntimeError("injected: the ledger could not be read")
            return expired()

        agent.ledger.expired = flaky
        await agent.start()
        await agent.lease("short", 1, Caller(uid=0))
        started = time.monotonic()
        while agent.ledger.controllers and time.monotonic() - started < 10:
            await asyncio.sleep(0.1)
        await agent.close()
        return len(calls), agent.ledger.controllers

    rounds, controllers = asyncio.run(scenario())
    assert rounds >= 3 and controllers == {}
    err = capfd.readouterr().err
    assert "housekeeping failed (it runs again in a second)" in err and "injected: the ledger" in err
