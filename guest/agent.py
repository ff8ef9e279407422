"""The hearth guest agent: PID 1 of every node's VM, started by the initramfs right after the kernel.

Standard library only, so it is up in a fraction of a second: boot time is the product.

    1. mount /proc, /sys, /dev, /run, /tmp; load GPU modules and list GPUs when there are any
    2. open the guest channel: vsock CID 2 port 1024 (Cloud Hypervisor), else the virtio-serial port named
       hearth.channel (QEMU); say hello with the node id (SMBIOS OEM string) and boot phases
    3. take the config: network (address, gateway), Ray (address, token, labels, CPUs, GPUs), env
    4. `ray start` with the token in its environment (never on a command line); say ready
    5. heartbeat; power off when told to stop, or when the host end has been gone for `reconnect_s`
       (the controller died, FLAME's dead man's switch): from the moment the config arrived, `ray start` too
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

VENV = "/opt/hearth/venv"
PORT_NAME = "hearth.channel"
GUEST_PORT = 1024
RB_POWER_OFF = 0x4321FEDC
FIXED_PORTS = {"node-manager-port": 6380, "object-manager-port": 6381, "dashboard-agent-listen-port": 6382,
               "dashboard-agent-grpc-port": 6383, "metrics-export-port": 6384, "runtime-env-agent-port": 6385}
RAYLET_WAIT_S = 300
# `ray start` wrapped in two corrections for slow (emulated) guests, nothing else about Ray changes:
# - it gives a new raylet 30 s (hard-coded) to register with the GCS: retry Ray's own lookup for RAYLET_WAIT_S;
# - it does not hand the raylet the dashboard agent's listen port, though the raylet has a flag for it, so the
#   raylet waits a fixed 15 s for the agent to write the port to a file, and aborts after that ("Timed out
#   waiting for file .../dashboard_agent_listen_port_<node>"). An agent under TCG needs longer than 15 s to
#   import itself; with the port given (the same fixed one the agent is told), the raylet does not wait.
RAY_START = f"""
import sys, time
import ray._private.services as services
lookup = services.get_node
def get_node(*args, **kwargs):
    deadline = time.monotonic() + {RAYLET_WAIT_S}
    while True:
        try:
            return lookup(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
services.get_node = get_node
start_process = services.start_ray_process
def start_ray_process(command, process_type, *args, **kwargs):
    if process_type == "raylet":
        command = [*command, "--dashboard_agent_listen_port={FIXED_PORTS['dashboard-agent-listen-port']}"]
    return start_process(command, process_type, *args, **kwargs)
services.start_ray_process = start_ray_process
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def say(message: str) -> None:
    print(f"hearth-guest: {message}", file=sys.stderr, flush=True)


def mount_basics() -> None:
    for source, target, kind in (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs"),
                                 ("tmpfs", "/run", "tmpfs"), ("tmpfs", "/tmp", "tmpfs"), ("devpts", "/dev/pts", "devpts"),
                                 ("tmpfs", "/dev/shm", "tmpfs")):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "-t", kind, source, target], stderr=subprocess.DEVNULL)


def node_id() -> str:
    """From the SMBIOS OEM strings (type 11) the VMM was given: hearth-node=<id>."""
    for entry in sorted(os.listdir("/sys/firmware/dmi/entries")) if os.path.isdir("/sys/firmware/dmi/entries") else []:
        if entry.startswith("11-"):
            raw = open(f"/sys/firmware/dmi/entries/{entry}/raw", "rb").read()
            for text in raw[raw[1]:].split(b"\0"):
                if text.startswith(b"hearth-node="):
                    return text.split(b"=", 1)[1].decode()
    return socket.gethostname()


def gpus() -> list[str]:
    """NVIDIA GPUs passed through (PCI class 0x0300/0x0302); their driver is loaded when the image has it."""
    found = []
    for address in sorted(os.listdir("/sys/bus/pci/devices")):
        base = f"/sys/bus/pci/devices/{address}"
        if open(f"{base}/vendor").read().strip() == "0x10de" and open(f"{base}/class").read()[:6] in ("0x0300", "0x0302"):
            found.append(address)
    if found:
        subprocess.run(["modprobe", "nvidia"], stderr=subprocess.DEVNULL)
        subprocess.run(["modprobe", "nvidia_uvm"], stderr=subprocess.DEVNULL)
    return found


class Channel:
    """JSON lines to the host over vsock or a virtio-serial port."""

    def __init__(self) -> None:
        self.fd = -1
        self.buffer = b""
        self.vsock: socket.socket | None = None
        self.sending = threading.Lock()  # the main thread and the channel's thread both send

    def open(self) -> None:
        subprocess.run(["modprobe", "-a", "vmw_vsock_virtio_transport", "virtio_console"], stderr=subprocess.DEVNULL)
        port = self._port()
        if port is not None:
            self.fd = os.open(port, os.O_RDWR | os.O_NONBLOCK)
            return
        self.vsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.vsock.connect((2, GUEST_PORT))
        self.fd = self.vsock.fileno()

    @staticmethod
    def _port() -> str | None:
        ports = "/sys/class/virtio-ports"
        for name in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
            if open(f"{ports}/{name}/name").read().strip() == PORT_NAME:
                return f"/dev/{name}"
        return None

    def send(self, message: dict) -> None:
        with self.sending:
            self._send(json.dumps(message).encode() + b"\n")

    def _send(self, data: bytes) -> None:
        while data:
            select.select([], [self.fd], [], 5)
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                continue

    def receive(self, timeout: float) -> dict | None:
        """The next message; None after `timeout`. EOFError when the host end is gone."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                time.sleep(0.2)  # a virtio-serial port reads empty while its host end is away
                raise EOFError
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def configure_network(network: dict) -> str | None:
    if not network:
        return None
    subprocess.run(["modprobe", "virtio_net"], stderr=subprocess.DEVNULL)
    interfaces = [n for n in sorted(os.listdir("/sys/class/net")) if n != "lo"]
    if not interfaces:
        say("no network interface")
        return None
    device = interfaces[0]
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", device, "up"],
                 ["ip", "addr", "add", network["address"], "dev", device],
                 ["ip", "route", "add", "default", "via", network["gateway"]]):
        subprocess.run(argv, check=True)
    return network["address"].split("/")[0]


def start_ray(ray: dict, env: dict, address: str | None) -> None:
    labels = ",".join(f"{k}={v}" for k, v in ray.get("labels", {}).items())
    argv = [f"{VENV}/bin/python3", "-c", RAY_START, "start", f"--address={ray['address']}", f"--num-cpus={ray.get('num_cpus', 1)}",
            f"--num-gpus={ray.get('num_gpus', 0)}", f"--labels={labels}", "--disable-usage-stats",
            "--temp-dir=/tmp/ray",  # the guest's own: by default a node takes the head's path, the controller's
            # Fixed ports (one node per VM): the raylet is given each agent's port instead of waiting, a fixed
            # 15 s, for the agent to write it to a file, which an emulated guest's agents are too slow for.
            *(f"--{name}={port}" for name, port in FIXED_PORTS.items())]
    if address:
        argv.append(f"--node-ip-address={address}")
    environment = {"PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": ray["token"], **env,
                   # How long the raylet waits for its runtime-env agent (30 s by default), which an emulated
                   # guest (TCG) may need longer to start.
                   "RAY_agent_register_timeout_ms": str(RAYLET_WAIT_S * 1000),
                   # The image's Python may differ from the controller's in the patch release (Debian's 3.11.x):
                   # Ray compares only major.minor then (see the README, "The guest image").
                   "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor"}
    done = subprocess.run(argv, env=environment, capture_output=True, text=True)
    if done.returncode != 0 or "Ray runtime started" not in done.stdout:
        say((done.stdout + done.stderr)[-3000:])
        logs = "/tmp/ray/session_latest/logs"
        for log in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            if log.startswith("raylet") or log.endswith(".err"):
                with contextlib.suppress(OSError):
                    say(f"--- {log}:\n" + open(f"{logs}/{log}", errors="replace").read()[-2000:])
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise RuntimeError(f"ray start failed ({done.returncode}): {lines[-1] if lines else 'no output'}")


def power_off(reason: str) -> None:
    """The node's disk layer is thrown away with the VM, so there is nothing to stop gracefully: end every
    process (Ray's daemons), flush, and power off."""
    say(f"powering off: {reason}")
    if os.getpid() != 1:
        sys.exit(0)  # a test run on a host: just end
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process
    os.sync()
    ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)


def reap() -> None:
    """PID 1 adopts every orphan (Ray's daemons among them): collect the ones that ended."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(channel: Channel, hello: dict, reconnect_s: float, ray_started: threading.Event) -> None:
    """Heartbeats; power off when told to, or when the host end has been gone for `reconnect_s`. Runs from the
    moment the config arrived, so a controller that dies during `ray start` is noticed too."""
    gone_since = None
    while True:
        if ray_started.is_set():  # not before: reaping then could take `ray start`'s own exit status
            reap()
        try:
            message = channel.receive(2.0)
        except EOFError:
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > reconnect_s:
                power_off(f"the host end has been gone for {reconnect_s:g} s")
            continue
        if gone_since is not None:  # it is back (an agent restart): say who we are again
            gone_since = None
            channel.send(hello)
        if message is not None and message.get("op") == "stop":
            power_off("told to stop")
        with contextlib.suppress(OSError):
            channel.send({"op": "heartbeat"})


def main() -> None:
    if os.getpid() == 1:
        mount_basics()
    started = uptime()
    me = node_id()
    found = gpus()
    channel = Channel()
    channel.open()
    hello = {"op": "hello", "node": me, "detail": f"guest agent up {started:.2f} s after the kernel started",
             "phases": {"kernel_s": started, "agent_s": uptime()}, "gpus": found}
    channel.send(hello)
    config = None
    while config is None:
        config = channel.receive(30)
    configured = uptime()
    ray_started = threading.Event()
    threading.Thread(target=serve, args=(channel, hello, float(config.get("reconnect_s", 30)), ray_started),
                     daemon=True).start()
    address = configure_network(config.get("network") or {})
    try:
        start_ray(config["ray"], config.get("env") or {}, address)
    except (RuntimeError, OSError, KeyError) as error:
        channel.send({"op": "failed", "detail": str(error)})
        power_off(str(error))
    ray_started.set()
    channel.send({"op": "ready", "phases": {"config_s": configured, "ray_s": uptime()}})
    threading.Event().wait()  # the channel's thread runs the node from here


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # noqa: BLE001 - PID 1 must not just die: say why, then power off
        import traceback

        traceback.print_exc()
        say(f"failed: {error!r}")
        power_off("the guest agent failed")
