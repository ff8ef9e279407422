"""The bad-input table: what a user, an admin or a controller can get wrong, across the CLI (`hearth up`,
`hearth vfio ...`, `hearth agent`), `Cluster(...)` and `Pool(...)`, the hosts file, the host agent's API
(bodies, paths, query strings, headers) and PCI addresses and driver names. Each is refused with a message
that names the problem and the fix, and nothing is written: the trees hearth would write to (the state and
run directories of clusters, the agent's state and run directories, the host root `hearth vfio` writes
under) are the same after as before. Nothing here starts Ray or a VM: bad input is refused before. The table
is printed at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from conftest import STANDIN, say
from hosts import HGX_GPUS, hgx_h100
from provisioner.agent.server import spawn
from provisioner.cli import app
from provisioner.errors import HearthError
from vfio.address import parse_address, parse_driver

SHA = "ab" * 32
TABLE: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """An agent (the cloud-hypervisor STAND-IN, never started here) on an HGX host tree with its GPUs on
    vfio-pci, a guest image's files, and the directories a cluster would write to; the table, printed at the end."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "host"
    hgx_h100(root, gpu_driver="vfio-pci")
    image = base / "image"
    image.mkdir()
    for part in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / part).write_bytes(b"\0" * 4096)
    short = Path(f"/tmp/hb-{os.getpid()}")
    short.mkdir(mode=0o700)
    agent = spawn(short / "a.sock", base / "agent-state", short / "vms", host_root=root, cloud_hypervisor=STANDIN,
                  log=base / "agent.log")
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(short / "a.sock")), base_url="http://agent", timeout=30)
    world = {"root": root, "image": image, "http": http, "state": base / "state", "run": base / "run",
             "agent_state": base / "agent-state", "agent_run": short / "vms", "base": base}
    yield world
    http.close()
    agent.terminate()
    agent.wait(30)
    for path in sorted(short.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    short.rmdir()
    width = max(len(case) for case, *_ in TABLE)
    say(request, "\n".join([f"\nbad-input table ({len(TABLE)} inputs, each refused, nothing written):",
                            f"  {'input':<{width}}  where  message (start)"]
                           + [f"  {case:<{width}}  {where:<5}  {message}" for case, where, message in TABLE]))


def snapshot(*trees: Path) -> dict[str, tuple]:
    """Every path under `trees` with its kind, size, mode and mtime: any write shows."""
    found = {}
    for tree in trees:
        for path in [tree, *tree.rglob("*")] if tree.exists() else []:
            facts = path.lstat()
            found[str(path)] = (facts.st_mode, facts.st_size, facts.st_mtime_ns)
    return found


# -- how each kind of input is given -------------------------------------------------------------------
def cli(*args: str, **env: str) -> Callable[[dict], str]:
    def run(world: dict) -> str:
        result = CliRunner().invoke(app, list(args), env={"HEARTH_STATE_DIR": str(world["state"]),
                                                          "HEARTH_RUN_DIR": str(world["run"]), **env})
        assert result.exit_code not in (0, None) and result.exception is None or isinstance(result.exception, SystemExit), \
            (result.exit_code, result.output, result.exception)
        return result.stderr
    return run


def cli_at(*args: str) -> Callable[[dict], str]:
    """`hearth vfio ...` against the host tree."""
    def run(world: dict) -> str:
        return cli(*args, "--host-root", str(world["root"]))(world)
    return run


def raises(make: Callable[[dict], object]) -> Callable[[dict], str]:
    def run(world: dict) -> str:
        with pytest.raises(HearthError) as refused:
            make(world)
        return str(refused.value)
    return run


def cluster(**options) -> Callable[[dict], str]:
    def make(world: dict) -> object:
        from provisioner import Cluster

        options.setdefault("sync_code", False)
        return Cluster(show=False, **{k: (v(world) if callable(v) else v) for k, v in options.items()})
    return raises(make)


def pool(**options) -> Callable[[dict], str]:
    def make(world: dict) -> object:
        from provisioner import Pool

        return Pool(sync_code=False, **{k: (v(world) if callable(v) else v) for k, v in options.items()})
    return raises(make)


def hosts_file(text: str) -> Callable[[dict], str]:
    def run(world: dict) -> str:
        path = world["base"] / "hosts.yaml"
        path.write_text(text)
        try:
            return cli("up", "--hosts", str(path), "--image", str(world["image"]))(world)
        finally:
            path.unlink()
    return run


def api(method: str, path: str, body=None, status: int = 400, raw: bytes | None = None,
        headers: dict[str, str] | None = None) -> Callable[[dict], str]:
    def run(world: dict) -> str:
        content = raw if raw is not None else (json.dumps(body(world) if callable(body) else body).encode()
                                               if body is not None else None)
        response = world["http"].request(method, path, content=content, headers=headers)
        assert response.status_code == status, (response.status_code, response.text)
        return response.json()["error"]
    return run


def vm_request(**node) -> Callable[[dict], dict]:
    def make(world: dict) -> dict:
        base = {"id": "n-0", "uid": "u1", "host": "a", "image": str(world["image"]), "gpus": [{"address": HGX_GPUS[0]}],
                "ray": {"address": "127.0.0.1:1", "token": "not-a-secret"}}
        top = {k[4:]: node.pop(k) for k in list(node) if k.startswith("top_")}
        return {"controller": "c1", "budget_s": 30, "node": {**base, **node}, "standin": {"guest": "builtin"}, **top}
    return make


def call(function, *args) -> Callable[[dict], str]:
    return raises(lambda world: function(*args))


# -- the table: (input, where, how it is given, words the refusal must contain: the problem and the fix) ----
CASES = [
    # hearth up
    ("up --nodes -1", "cli", cli("up", "--nodes", "-1"), ["nodes: ask for 0 to 1024 nodes"]),
    ("up --gpus-per-node 99", "cli", cli("up", "--gpus-per-node", "99"), ["a node has 0 to 16 GPUs"]),
    ("up --backend qemu-kvm", "cli", cli("up", "--backend", "qemu-kvm"),
     ["backend: Input should be 'local', 'cloud-hypervisor' or 'qemu'"]),
    ("up --name 'Bad Name!'", "cli", cli("up", "--name", "Bad Name!"), ["use up to 24 lower-case letters"]),
    ("up --boot-timeout 0", "cli", cli("up", "--boot-timeout", "0"), ["boot_timeout is in seconds, more than 0"]),
    ("up --boot-timeout nan", "cli", cli("up", "--boot-timeout", "nan"), ["boot_timeout is in seconds", "at most 86400"]),
    ("up --boot-timeout inf", "cli", cli("up", "--boot-timeout", "inf"), ["at most 86400 (a day)"]),
    ("up --min-nodes 5 --nodes 2", "cli", cli("up", "--nodes", "2", "--min-nodes", "5"),
     ["min_nodes must be between 0 and nodes (2)"]),
    ("up --backend cloud-hypervisor, no --image", "cli", cli("up", "--backend", "cloud-hypervisor"),
     ["needs image=", "`hearth guest build` makes one"]),
    ("up --cpus 0", "cli", cli("up", "--cpus", "0"), ["a node has 1 to 254 CPUs"]),
    ("up --memory-gib 0", "cli", cli("up", "--memory-gib", "0"), ["give each node at least 1 GiB"]),
    ("up --hosts missing.yaml", "cli", cli("up", "--hosts", "/nonexistent/hosts.yaml", "--image", "/tmp"),
     ["hosts file /nonexistent/hosts.yaml: No such file or directory"]),
    # hearth vfio
    ("vfio bind 0000:zz:00.0", "vfio", cli_at("vfio", "bind", "0000:zz:00.0"),
     ["is not a PCI address; use the sysfs form 0000:3b:00.0"]),
    ("vfio bind ../../etc/passwd", "vfio", cli_at("vfio", "bind", "../../etc/passwd"), ["is not a PCI address"]),
    ("vfio bind 0000:3b:00.8 (function 8)", "vfio", cli_at("vfio", "bind", "0000:3b:00.8"), ["is not a PCI address"]),
    ("vfio unbind --driver ../x", "vfio", cli_at("vfio", "unbind", HGX_GPUS[0], "--driver", "../x"),
     ["is not a kernel driver name; use a name as listed in /sys/bus/pci/drivers"]),
    ("vfio bind (nothing named)", "vfio", cli_at("vfio", "bind"),
     ["name the devices: give ADDRESS..., --all-gpus or --persisted"]),
    # hearth agent
    ("agent --subnet 10.0.0.0/31", "cli", cli("agent", "--subnet", "10.0.0.0/31", "--bridge", "x"),
     ["a host subnet needs room for a gateway and guests: /30 or bigger"]),
    ("agent --subnet not-a-subnet", "cli", cli("agent", "--subnet", "nope", "--bridge", "x"),
     ["subnet: Input is not a valid IPv4 network"]),
    ("agent --bridge missing0", "cli", lambda w: cli("agent", "--bridge", "missing0", "--subnet", "10.9.9.0/24",
                                                     "--state-dir", str(w["base"] / "s2"), "--run-dir",
                                                     str(w["base"] / "r2"), "--socket", str(w["base"] / "x.sock"))(w),
     ["bridge missing0 does not exist: create it"]),
    ("agent --bridge, no --subnet", "cli", cli("agent", "--bridge", "x"), ["--bridge needs --subnet"]),
    ("agent --state-dir /tmp (others write there)", "cli",
     lambda w: cli("agent", "--state-dir", "/tmp", "--socket", str(w["base"] / "x.sock"))(w),
     ["--state-dir /tmp is owned by uid 0 with mode 1777", "only it may write there"]),
    ("HEARTH_STANDIN='not json'", "cli", cli("agent", HEARTH_STANDIN="not json"),
     ["HEARTH_STANDIN is not JSON", "give it an object"]),
    ("HEARTH_STANDIN with a real VMM", "cli", cli("agent", HEARTH_STANDIN='{"guest": "builtin"}'),
     ["the VMM is not cloud-hypervisor-standin: unset it"]),
    ("HEARTH_AGENT_ENV_MARGIN=lots", "cli", cli("agent", HEARTH_AGENT_ENV_MARGIN="lots"),
     ["is neither a size (5G, 500M, bytes) nor a share of the disk", "fix HEARTH_AGENT_ENV_MARGIN"]),
    # Cluster(...) and Pool(...)
    ("Cluster(nodes=-1)", "py", cluster(nodes=-1), ["nodes: ask for 0 to 1024 nodes"]),
    ("Cluster(labels={'hearth.io/node': ...})", "py", cluster(labels={"hearth.io/node": "x"}),
     ["uses a reserved prefix", "hearth sets those itself"]),
    ("Cluster(env={'RAY_AUTH_TOKEN': ...})", "py", cluster(env={"RAY_AUTH_TOKEN": "x"}),
     ["hearth sets Ray's authentication itself"]),
    ("Cluster(boot_timeout=inf)", "py", cluster(boot_timeout=float("inf")), ["at most 86400 (a day)"]),
    ("Cluster(name='UPPER')", "py", cluster(name="UPPER"), ["use up to 24 lower-case letters"]),
    ("Cluster(speed='fast')", "py", raises(lambda w: __import__("provisioner.spec").spec.cluster_spec(speed="fast")),
     ["speed: Extra inputs are not permitted"]),
    ("Cluster(hosts=missing)", "py", cluster(hosts="/nonexistent/hosts.yaml", image=lambda w: w["image"]),
     ["hosts file /nonexistent/hosts.yaml: No such file or directory"]),
    ("Pool(min=3, max=1)", "py", pool(min=3, max=1), ["Pool needs 0 <= min <= max (got min=3, max=1)"]),
    ("Pool(max_concurrency=0)", "py", pool(max_concurrency=0), ["max_concurrency is at least 1 call per node"]),
    ("Pool(boot_timeout=-1)", "py", pool(boot_timeout=-1), ["boot_timeout is in seconds, more than 0"]),
    # the hosts file
    ("hosts: address ftp://gpu01", "yaml", hosts_file("hosts:\n  - name: g\n    address: ftp://gpu01\n"),
     ["address is 'local' or ssh://user@host[:port]"]),
    ("hosts: a name twice", "yaml", hosts_file("hosts:\n  - name: g\n  - name: g\n"), ["host names repeat: ['g']"]),
    ("hosts: unquoted PCI addresses", "yaml",
     hosts_file("hosts:\n  - name: g\n    nvlink_cliques: [[0000:18:00.0]]\n"), ["quote PCI addresses in YAML"]),
    ("hosts: overlapping subnets", "yaml", hosts_file(
        "hosts:\n  - {name: a, network: {subnet: 10.1.0.0/16}}\n  - {name: b, network: {subnet: 10.1.2.0/24}}\n"),
     ["have overlapping subnets", "give every host its own slice"]),
    ("hosts: unknown key", "yaml", hosts_file("hosts:\n  - name: g\n    speed: fast\n"),
     ["speed: Extra inputs are not permitted"]),
    ("hosts: not YAML", "yaml", hosts_file("hosts: [\n"), ["is not valid YAML"]),
    ("hosts: max_concurrent_boots 0", "yaml", hosts_file("hosts:\n  - name: g\n    max_concurrent_boots: 0\n"),
     ["max_concurrent_boots is at least 1 (leave it out for no limit)"]),
    ("hosts: none listed", "yaml", hosts_file("hosts: []\n"), ["list at least one host under hosts:"]),
    ("hosts: clique 0000:zz:00.0", "yaml", hosts_file("hosts:\n  - name: g\n    nvlink_cliques: [['0000:zz:00.0']]\n"),
     ["is not a PCI address"]),
    ("hosts: subnet 10.0.0.300/24", "yaml", hosts_file("hosts:\n  - {name: g, network: {subnet: 10.0.0.300/24}}\n"),
     ["subnet: Input is not a valid IPv4 network"]),
    # the agent's API: bodies
    ("PUT /v1/vms: not JSON", "api", api("PUT", "/v1/vms/n-0", raw=b"{nope"), ["the request body is not JSON"]),
    ("PUT /v1/vms: unknown key", "api", api("PUT", "/v1/vms/n-0", vm_request(top_speed="fast")),
     ["speed: Extra inputs are not permitted"]),
    ("PUT /v1/vms: cpus 0", "api", api("PUT", "/v1/vms/n-0", vm_request(cpus=0)), ["node.cpus: a node has 1 to 254 vCPUs"]),
    ("PUT /v1/vms: lease_s NaN", "api",
     api("PUT", "/v1/vms/n-0", raw=b'{"controller": "c1", "lease_s": NaN, "node": {}}'),
     ["lease_s: Input should be a finite number"]),
    ("PUT /v1/vms: lease_s 1e9", "api", api("PUT", "/v1/vms/n-0", vm_request(top_lease_s=1e9)),
     ["lease_s: Input should be less than or equal to 3600"]),
    ("PUT /v1/vms: budget_s -1", "api", api("PUT", "/v1/vms/n-0", vm_request(top_budget_s=-1)),
     ["budget_s: Input should be greater than 0"]),
    ("PUT /v1/vms: node id ../x", "api", api("PUT", "/v1/vms/n-0", vm_request(id="../x")),
     ["node.id: a node id is up to 63 lower-case letters"]),
    ("PUT /v1/vms: GPU ../../etc", "api", api("PUT", "/v1/vms/n-0", vm_request(gpus=[{"address": "../../etc"}])),
     ["is not a PCI address"]),
    ("PUT /v1/vms: controller 'bad name!'", "api", api("PUT", "/v1/vms/n-0", vm_request(top_controller="bad name!")),
     ["controller: String should match pattern"]),
    ("PUT /v1/vms: a 2 MiB body", "api", api("PUT", "/v1/vms/n-0", raw=b"{" + b" " * (2 << 20) + b"}", status=413),
     ["the request body is over 1048576 bytes"]),
    ("PUT /v1/vms: uid ../x", "api", api("PUT", "/v1/vms/n-0", vm_request(uid="../x")), ["node.uid: a boot attempt's uid"]),
    # the agent's API: paths, query strings, headers
    ("PUT /v1/vms/UPPER", "api", api("PUT", "/v1/vms/UPPER", vm_request(id="UPPER")), ["is not a VM id"]),
    ("GET /v1/vms/..%2Fetc", "api", api("GET", "/v1/vms/..%2Fetc"), ["'../etc' is not a VM id"]),
    ("GET ?wait=nan", "api", api("GET", "/v1/vms/n-0?wait=nan"), ["wait='nan': give a number of seconds from 0 to 60"]),
    ("GET ?wait=1e9", "api", api("GET", "/v1/vms/n-0?wait=1e9"), ["give a number of seconds from 0 to 60"]),
    ("GET ?after=-1", "api", api("GET", "/v1/vms/n-0?after=-1"), ["after='-1': give a whole number from 0 to 10000"]),
    ("GET ?after=1.5", "api", api("GET", "/v1/vms/n-0?after=1.5"), ["give a whole number"]),
    ("GET ?uid=../x", "api", api("GET", "/v1/vms/n-0?uid=../x"), ["is not a boot attempt's uid"]),
    ("GET ?wait=1&wait=2", "api", api("GET", "/v1/vms/n-0?wait=1&wait=2"), ["query parameter wait is given more than once"]),
    ("GET ?bogus=1", "api", api("GET", "/v1/vms/n-0?bogus=1"), ["unknown query parameter 'bogus'", "it takes after, wait, uid"]),
    ("DELETE ?grace=inf", "api", api("DELETE", "/v1/vms/n-0?grace=inf"), ["grace='inf': give a number of seconds from 0 to 120"]),
    ("DELETE ?grace=1000", "api", api("DELETE", "/v1/vms/n-0?grace=1000"), ["from 0 to 120"]),
    ("POST /v1/leases ?ttl=nan", "api", api("POST", "/v1/leases/c1?ttl=nan"), ["ttl='nan': give a number of seconds from 1 to 3600"]),
    ("POST /v1/leases ?ttl=0", "api", api("POST", "/v1/leases/c1?ttl=0"), ["from 1 to 3600"]),
    ("POST /v1/leases ?ttl=99999", "api", api("POST", "/v1/leases/c1?ttl=99999"), ["from 1 to 3600"]),
    ("POST /v1/leases/..%2Fx", "api", api("POST", "/v1/leases/..%2Fx"), ["'../x' is not a controller name"]),
    ("GET /v1/envs/not-a-sha", "api", api("GET", "/v1/envs/not-a-sha"), ["is not an env image name: 64 lower-case hex"]),
    ("PUT /v1/envs ?offset=-1", "api", api("PUT", f"/v1/envs/{SHA}?offset=-1", raw=b"x",
                                           headers={"X-Hearth-Env-Size": "1"}), ["offset='-1': give a whole number"]),
    ("PUT /v1/envs without its size", "api", api("PUT", f"/v1/envs/{SHA}", raw=b"x"),
     ["needs the image's whole size in the X-Hearth-Env-Size header"]),
    ("GET /v1/info?image=relative", "api", api("GET", "/v1/info?image=relative/dir"), ["is not an absolute path"]),
    ("GET /v1/info?image=/a/../../etc", "api", api("GET", "/v1/info?image=/a/../../etc"), ["without '..'"]),
    ("X-Hearth-Controller without secret", "api",
     api("GET", "/v1/vms", status=403, headers={"X-Hearth-Controller": "c1"}), ["send both X-Hearth-Controller and"]),
    ("GET /v1/nothing", "api", api("GET", "/v1/nothing", status=404), ["GET /v1/nothing: Not Found", "the API is listed"]),
    # PCI addresses and names
    ("address 3b:00 (no function)", "pci", call(parse_address, "3b:00"), ["use the sysfs form 0000:3b:00.0"]),
    ("address 10000:3b:00.0 (domain)", "pci", call(parse_address, "10000:3b:00.0"), ["is not a PCI address"]),
    ("address with a newline", "pci", call(parse_address, "0000:3b:00.0\n/etc"), ["is not a PCI address"]),
    ("driver 'vfio-pci/../x'", "pci", call(parse_driver, "vfio-pci/../x"), ["is not a kernel driver name; use a name"]),
]


@pytest.mark.parametrize("case, where, give, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_fix_and_nothing_is_written(case, where, give, words, world, monkeypatch):
    monkeypatch.setenv("HEARTH_STATE_DIR", str(world["state"]))
    monkeypatch.setenv("HEARTH_RUN_DIR", str(world["run"]))
    trees = (world["state"], world["run"], world["agent_state"], world["agent_run"], world["root"], world["base"] / "s2",
             world["base"] / "r2")
    before = snapshot(*trees)
    message = give(world)
    assert all(w in message for w in words), f"{case}: {message!r} lacks {[w for w in words if w not in message]}"
    assert snapshot(*trees) == before, f"{case} wrote something"
    TABLE.append((case, where, " ".join(message.split())[:90]))


def test_there_are_at_least_forty():
    assert len(CASES) >= 40
