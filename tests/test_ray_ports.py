"""What a node's Ray (and the head's) listens on, and that each listener turns away a caller without the
cluster's token.

A node is started as every hearth node starts (guest/agent.py's `ray_start` wrapper, the head's token in its
environment, the ports hearth picks) against a real head, on this machine's own non-loopback address as a VM
node runs on its guest address; a task runs there so a worker listens too. Then every TCP listener of the
node's processes, and of the head's, is asked without the token: HTTP ones answer 401, gRPC ones
UNAUTHENTICATED. The metrics
export port (Prometheus, which Ray serves unauthenticated on every interface) is not open at all. The README's
"Ports" section is this table."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from guest.agent import PORT_FLAGS, ray_start
from provisioner.ray_head import RayHead, free_ports, local_env

pytestmark = pytest.mark.slow
GRPC_METHODS = ("/ray.rpc.NodeManagerService/GetNodeStats", "/ray.rpc.ObjectManagerService/Pull",
                "/ray.rpc.ReporterService/HealthCheck", "/ray.rpc.CoreWorkerService/GetObjectStatus",
                "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.RayletDriver/ClusterInfo")


def _node_address() -> str:
    """An address of this machine's that is not loopback, as a VM's guest address is not."""
    shown = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout)
    for link in shown:
        for address in link.get("addr_info", []):
            if not address["local"].startswith("127."):
                return address["local"]
    pytest.fail("this machine has no IPv4 address but loopback")


def _answer(host: str, port: int) -> str:
    """How a listener answers a caller without the token: 'http <status>', 'grpc <code>', or what happened."""
    import grpc

    try:
        urllib.request.urlopen(f"http://{host}:{port}/api/v0/nodes", timeout=5)
        return "http 200"
    except urllib.error.HTTPError as error:
        return f"http {error.code}"
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        pass  # not HTTP/1: gRPC speaks HTTP/2 only
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        codes = []
        for method in GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=5)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
    return "grpc UNAUTHENTICATED" if "UNAUTHENTICATED" in codes else f"grpc {','.join(codes)}"


def _listening(root) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP listener of `root` and its descendants."""
    import psutil

    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            found += [(process.name(), c.laddr.ip, c.laddr.port)
                      for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def test_every_port_a_node_listens_on_checks_the_token_and_metrics_are_closed(run_dir):
    import psutil
    import ray

    address = _node_address()
    head = RayHead(run_dir / "head", host=address)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    node = None

    async def start_head() -> None:
        await head.start()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(start_head())
        log = open(run_dir / "node.log", "wb")
        node = subprocess.Popen([*ray_start(sys.executable, ports), f"--address={head.address}", "--block",
                                 "--num-cpus=1", f"--node-ip-address={address}", f"--temp-dir={run_dir / 'n'}",
                                 "--disable-usage-stats", "--labels=hearth.io/node=ports-0"],
                                env=local_env(**head.env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (run_dir / "node.log").read_text():
            assert node.poll() is None and time.monotonic() < deadline, (run_dir / "node.log").read_text()
            time.sleep(0.5)
        head.use_in_this_process()
        ray.init(address=head.address, logging_level="ERROR")
        try:  # a worker on the node: it listens too
            where = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_labels()["hearth.io/node"])
            assert ray.get(where.options(label_selector={"hearth.io/node": "ports-0"}).remote(), timeout=180) == "ports-0"
            expected = {ports[flag] for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
                                                 "dashboard-agent-listen-port", "runtime-env-agent-port")}
            deadline = time.monotonic() + 180
            while True:  # the dashboard agent takes its time to import itself on a loaded machine
                listening = _listening(psutil.Process(node.pid))
                if expected <= {port for _, _, port in listening} or time.monotonic() > deadline:
                    break
                time.sleep(1)
            roles = {port: flag for flag, port in ports.items()}
            roles |= {head.gcs_port: "head: GCS", head.dashboard_port: "head: dashboard",
                      head.client_port: "head: Ray client server"}
            table = []
            for who, found in (("node", listening), ("head", _listening(psutil.Process(head.process.pid)))):
                for name, ip, port in sorted(found, key=lambda entry: entry[2]):
                    host = address if ip in ("0.0.0.0", "::") else ip.removeprefix("::ffff:")
                    agent = name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
                    role = roles.get(port, f"{who}: {'worker' if name.startswith('ray::') and not agent else name}")
                    table.append((role, ip, port, _answer(host, port)))
        finally:
            ray.shutdown()
    finally:
        if node is not None and node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)
        loop.run_until_complete(head.stop())
        loop.close()
        for key in head.env:
            os.environ.pop(key, None)
    print("\n" + "\n".join(f"{role:30} {ip:16} {port:6} {answer}" for role, ip, port, answer in table))
    assert ports["metrics-export-port"] not in [port for _, _, port, _ in table]  # Prometheus's, unauthenticated
    seen = {role for role, *_ in table}
    assert {"node-manager-port", "object-manager-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
            "runtime-env-agent-port"} <= seen, table
    assert {"head: GCS", "head: dashboard", "head: Ray client server"} <= seen, table
    for role, ip, port, answer in table:  # loopback too: on the controller, other local users reach it
        assert answer in ("http 401", "grpc UNAUTHENTICATED"), (role, ip, port, answer)
