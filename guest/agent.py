"""The hearth guest agent: PID 1 of every node's VM, started by the initramfs right after the kernel.

Standard library only, so it is up in a fraction of a second: boot time is the product. (With GPUs, NVML's
Python binding, NVIDIA's nvidia-ml-py, comes from the image's venv: see "GPUs" below.)

    1. mount /proc, /sys, /dev, /run, /tmp; with NVIDIA GPUs: load the driver, wait for the devices, read each
       GPU through NVML and turn persistence mode on ("no NVIDIA GPU" when there is none)
    2. open the guest channel: vsock CID 2 port 1024 (Cloud Hypervisor), else the virtio-serial port named
       hearth.channel (QEMU); say hello with the node id (SMBIOS OEM string) and boot phases
    3. take the config: network (address, gateway), Ray (address, token, labels, CPUs), env, the GPUs the VM
       was given: refuse (failed, with the driver's own words: modprobe's and the kernel's NVRM lines) when the
       GPUs found differ from those or the driver did not come up; Ray gets the GPUs the guest has
    4. `ray start` with the token in its environment (never on a command line); say ready, or say failed
       with `ray start`'s last words and power off
    5. heartbeat; power off when told to stop, or when the host end has been gone for `reconnect_s` (the
       controller or its host agent died: FLAME's dead man's switch), from the moment the config arrived,
       `ray start` included. Meanwhile the channel reconnects (a restarting host agent comes back with a new
       listener) and says hello, and ready, again. A line it cannot read is logged and skipped.

Where it runs decides what it may do, by construction, not by a flag it could be given:
    Vm      PID 1 of a VM: mounts, loads modules, sets the network and hostname, powers the VM off (reboot(2)).
    Hosted  any other process: cloud-hypervisor-standin runs it on a host as the guest of a stand-in VM, with
            HEARTH_GUEST_HOSTED naming the VM's vsock socket (CH's host side: `<socket>_<port>`). It mounts
            nothing, loads no module, leaves the network alone, and its "power off" ends its own process
            group, which it must lead. Not PID 1 and without that variable, it refuses to run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

VENV = "/opt/hearth/venv"
ENV_MOUNT = "/opt/hearth/env"  # the controller's environment image (provisioner/envimage.py), when attached
EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")  # at byte 1024 of an erofs filesystem
PORT_NAME = "hearth.channel"
GUEST_PORT = 1024
RB_POWER_OFF = 0x4321FEDC
PR_SET_CHILD_SUBREAPER = 36
PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")
VM_PORTS = dict(zip(PORT_FLAGS, range(6380, 6386)))  # one node per VM: fixed ports
ALONE_S = 60.0  # how long a guest waits for a host end to configure it before it powers off
RAYLET_WAIT_S = 300
# `ray start` wrapped in two corrections for slow machines (emulated guests, loaded hosts) and one for safety,
# nothing else about Ray changes; every Ray node hearth starts (the head, local nodes, guests) starts this way:
# - it gives a new raylet 30 s (hard-coded in ray/_private/node.py) to register with the GCS: retry Ray's own
#   lookup for RAYLET_WAIT_S;
# - it does not hand the raylet the dashboard agent's listen port, though the raylet has a flag for it, so the
#   raylet waits a fixed 15 s for the agent to write the port to a file, and aborts after that ("Timed out
#   waiting for file .../dashboard_agent_listen_port_<node>"). An agent under TCG needs longer than 15 s to
#   import itself; with the port given (the same one the agent is told), the raylet does not wait;
# - its dashboard agent serves the node's metrics for Prometheus at --metrics-export-port on every interface
#   with no authentication (Ray has no flag to bind it elsewhere; every other port a node listens on checks the
#   cluster's token): the agent is started with --disable-metrics-collection, so that port is never opened.
#   The dashboard's own node view does not need it. On the head, the dashboard and the autoscaler's monitor
#   each serve theirs the same way, on fixed ports (44227, 44217) of every interface: their Prometheus server is
#   not started either. HEARTH_RAY_METRICS_EXPORT=1 in a cluster's env opens them all again, for a Prometheus
#   that scrapes the nodes (README: "Ports").
RAY_START = """
import os, sys, time
import ray._private.services as services
lookup = services.get_node
def get_node(*args, **kwargs):
    deadline = time.monotonic() + {wait}
    while True:
        try:
            return lookup(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
services.get_node = get_node
start_process = services.start_ray_process
metrics = os.environ.get("HEARTH_RAY_METRICS_EXPORT") == "1"
no_exporter = ("import prometheus_client, runpy, sys; prometheus_client.start_http_server = lambda *a, **k: None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
def start_ray_process(command, process_type, *args, **kwargs):
    if process_type == "raylet":
        command = [*command, "--dashboard_agent_listen_port={port}"]
        if not metrics:
            agent = "--dashboard_agent_command="
            command = [c + " --disable-metrics-collection" if c.startswith(agent) else c for c in command]
    elif process_type in ("dashboard", "monitor") and not metrics:
        script = next((i for i, c in enumerate(command) if c.endswith(".py")), None)
        if script is not None:
            command = [*command[:script], "-c", no_exporter, *command[script:]]
    return start_process(command, process_type, *args, **kwargs)
services.start_ray_process = start_ray_process
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def ray_start(python: str, ports: dict[str, int]) -> list[str]:
    """`ray start` run by `python`, corrected as above, with the raylet's and its agents' ports (PORT_FLAGS)."""
    wrapper = RAY_START.format(wait=RAYLET_WAIT_S, port=ports["dashboard-agent-listen-port"])
    return [python, "-c", wrapper, "start", *(f"--{name}={port}" for name, port in ports.items())]


def say(message: str) -> None:
    print(f"hearth-guest: {message}", file=sys.stderr, flush=True)


# -- where it runs ------------------------------------------------------------------------------------
class Vm:
    """PID 1 of a VM: the machine is the node's own."""

    python = f"{VENV}/bin/python3"
    ray_dir = "/tmp/ray"  # the guest's own: by default a node takes the head's path, the controller's

    def __init__(self) -> None:
        for source, target, kind in (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"),
                                     ("devtmpfs", "/dev", "devtmpfs"), ("tmpfs", "/run", "tmpfs"),
                                     ("tmpfs", "/tmp", "tmpfs"), ("devpts", "/dev/pts", "devpts"),
                                     ("tmpfs", "/dev/shm", "tmpfs")):
            os.makedirs(target, exist_ok=True)
            subprocess.run(["mount", "-t", kind, source, target], stderr=subprocess.DEVNULL)
        self.ports = VM_PORTS

    @staticmethod
    def uptime() -> float:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])

    @staticmethod
    def node_id() -> str:
        """From the SMBIOS OEM strings (type 11) the VMM was given: hearth-node=<id>."""
        entries = "/sys/firmware/dmi/entries"
        for entry in sorted(os.listdir(entries)) if os.path.isdir(entries) else []:
            if entry.startswith("11-"):
                raw = open(f"{entries}/{entry}/raw", "rb").read()
                for text in raw[raw[1]:].split(b"\0"):
                    if text.startswith(b"hearth-node="):
                        return text.split(b"=", 1)[1].decode()
        return socket.gethostname()

    @staticmethod
    def set_hostname(name: str) -> None:
        """The node's name, resolvable locally (there is no DNS server in the guest)."""
        with contextlib.suppress(OSError):
            socket.sethostname(name)
            with open("/etc/hosts", "a") as hosts:
                hosts.write(f"127.0.1.1\t{name}\n")

    @staticmethod
    def gpus() -> dict:
        """The GPUs passed through, driver loaded and read (see `gpu_report`)."""
        return gpu_report(pci_gpus("/sys"), nvml_binding)

    @staticmethod
    def no_gpu_words() -> str:
        """Why there is no GPU, in the driver's words: it is loaded anyway and says so ("No NVIDIA GPU found")."""
        return load_driver() or "the driver loaded, yet no NVIDIA GPU is on the guest's PCI bus"

    @staticmethod
    def connect() -> socket.socket | int:
        """The guest channel: a virtio-serial port's fd (QEMU), else a vsock connection to the host (CH)."""
        subprocess.run(["modprobe", "-a", "vmw_vsock_virtio_transport", "virtio_console"], stderr=subprocess.DEVNULL)
        ports = "/sys/class/virtio-ports"
        for name in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
            if open(f"{ports}/{name}/name").read().strip() == PORT_NAME:
                return os.open(f"/dev/{name}", os.O_RDWR | os.O_NONBLOCK)
        vsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            vsock.connect((2, GUEST_PORT))
        except OSError:
            vsock.close()
            raise
        return vsock

    @staticmethod
    def configure_network(network: dict) -> str | None:
        if not network:
            return None
        subprocess.run(["modprobe", "virtio_net"], stderr=subprocess.DEVNULL)
        interfaces = [n for n in sorted(os.listdir("/sys/class/net")) if n != "lo"]
        if not interfaces:
            raise RuntimeError("the VM has no network interface")
        device = interfaces[0]
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", device, "up"],
                     ["ip", "addr", "add", network["address"], "dev", device],
                     ["ip", "route", "add", "default", "via", network["gateway"]]):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"network: `{' '.join(argv)}` failed: {done.stderr.strip()}")
        return network["address"].split("/")[0]

    @staticmethod
    def mount_env(env_image: dict) -> str:
        """Mount the environment image's disk (the one erofs disk besides the root) read-only, check it is the
        image the host meant, and return its Python, which Ray then runs on (and starts its workers with)."""
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("vd") or name == "vda":
                continue
            with open(f"/dev/{name}", "rb") as disk:
                disk.seek(1024)
                if disk.read(4) != EROFS_MAGIC:
                    continue
            os.makedirs(ENV_MOUNT, exist_ok=True)
            done = subprocess.run(["mount", "-t", "erofs", "-o", "ro", f"/dev/{name}", ENV_MOUNT], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"cannot mount the environment image /dev/{name}: {done.stderr.strip()}")
            with open(f"{ENV_MOUNT}/hearth-env.json") as f:
                key = json.load(f)["key"]
            if key != env_image["key"]:
                raise RuntimeError(f"/dev/{name} holds environment {key[:12]}, not {env_image['key'][:12]}")
            return f"{ENV_MOUNT}/bin/python3"
        raise RuntimeError("no disk holds the environment image the host attached (no erofs disk besides /dev/vda)")

    @staticmethod
    def vm_gone() -> bool:
        return False  # PID 1 goes with its VM

    @staticmethod
    def reap() -> None:
        """PID 1 adopts every orphan (Ray's daemons among them): collect the ones that ended."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    @staticmethod
    def power_off(reason: str) -> None:
        """The node's disk layer goes with the VM, so there is nothing to stop gracefully: end every process
        (Ray's daemons), flush, power off."""
        say(f"powering off: {reason}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)  # from PID 1: every other process
        os.sync()
        ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)


class Hosted:
    """A stand-in VM's guest, on a host: it touches nothing but its own processes and its own temp dir."""

    python = sys.executable

    def __init__(self, vsock_socket: str) -> None:
        if os.getpgrp() != os.getpid():
            raise SystemExit("hearth guest agent (hosted): it must lead its own process group (start_new_session), "
                             "so that powering off ends only its own processes")
        self.path = f"{vsock_socket}_{GUEST_PORT}"  # as Cloud Hypervisor maps a guest's connection to port P
        self.booted_at = float(os.environ.get("HEARTH_GUEST_BOOTED_AT") or time.time())
        self.vmm = os.getppid()  # the stand-in: when it is gone, so is this VM
        # The VM's own disk, which the stand-in made and removes (short: Ray's socket paths live under it).
        self.ray_dir = os.environ.get("HEARTH_GUEST_TMP") or tempfile.mkdtemp(prefix="hg-", dir="/tmp")
        self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))  # VMs share this host's ports
        with contextlib.suppress(OSError, AttributeError):  # Ray's daemons stay ours to reap and to end
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)

    def uptime(self) -> float:
        return time.time() - self.booted_at

    @staticmethod
    def node_id() -> str:
        oem = dict(line.split("=", 1) for line in os.environ.get("HEARTH_SMBIOS_OEM", "").splitlines() if "=" in line)
        return oem.get("hearth-node", "unknown")

    def set_hostname(self, name: str) -> None:
        pass  # the host's name is not the node's

    @staticmethod
    def gpus() -> dict:
        """The host's GPUs are not this node's, and it touches none: it reports the GPUs its stand-in VMM says
        it passed (HEARTH_GUEST_GPUS), simulated, no driver."""
        found = json.loads(os.environ.get("HEARTH_GUEST_GPUS") or "[]")
        return {"gpus": [{**g, "name": "simulated by cloud-hypervisor-standin"} for g in found], "driver": None,
                "problem": None, "seconds": None}

    @staticmethod
    def no_gpu_words() -> str:
        return "the stand-in VMM passed no GPU (hosted guest: no driver to ask)"

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def configure_network(network: dict) -> None:
        return None  # the host's network is not the node's: Ray finds the head from here as it is

    def mount_env(self, env_image: dict) -> str:
        return self.python  # it mounts nothing: the host's own environment is the one the stand-in runs on

    reap = staticmethod(Vm.reap)

    def vm_gone(self) -> bool:
        return os.getppid() != self.vmm

    def power_off(self, reason: str) -> None:
        say(f"powering off (hosted: ending this guest's own process group): {reason}")
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def where() -> Vm | Hosted:
    if os.getpid() == 1:
        return Vm()
    hosted = os.environ.get("HEARTH_GUEST_HOSTED")
    if not hosted:
        raise SystemExit("hearth guest agent: this is PID 1 of a node's VM (the initramfs starts it). On a host, only "
                         "cloud-hypervisor-standin runs it, with HEARTH_GUEST_HOSTED set (see provisioner/ch/standin.py)")
    return Hosted(hosted)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _toward(head: str) -> str:
    """This machine's address on the way to `head` (host:port), as Ray itself works it out."""
    host, port = head.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, int(port)))
        return probe.getsockname()[0]


# -- GPUs -----------------------------------------------------------------------------------------------
# In the VM: the NVIDIA GPUs on its PCI bus (class 0x0300/0x0302), `modprobe nvidia nvidia_uvm` (the image built
# with --nvidia-driver has the modules for its kernel), a bounded wait for the driver to probe each GPU
# (/proc/driver/nvidia/gpus/<address>), the device nodes (no udev here), then NVML: each GPU's UUID, name, PCI
# device id, memory and ECC mode, and persistence mode on (it keeps the GPU initialised between clients: the
# first initialisation, the GSP firmware's boot, takes seconds). NVML through nvidia-ml-py, NVIDIA's own binding
# (pure Python, in the image's venv, imported only here): its ctypes layouts of NVML's structs are NVIDIA's, which
# a hand-written binding could only be checked against on a GPU host. Tests hand `read_gpus` a stand-in with its
# call shapes (tests/fakenvml.py); the binding is an argument, never looked up from the environment.
NVIDIA = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")
NV_MAJOR = 195  # nvidia.ko's fixed character major (NV_MAJOR_DEVICE_NUMBER); nvidiactl is minor 255
DEVICES_WAIT_S = 30.0  # modprobe returns once the driver probed: this bounds a slow or stuck probe
NVML_WAIT_S, NVML_PER_GPU_S = 60.0, 30.0  # the first NVML init boots each GPU's GSP (7 s for one in a published
#   log); persistence mode took over 25 s on A100 (Azure/AgentBaker#2829): sized for the slow end, per GPU


def pci_gpus(sysfs: str) -> list[dict]:
    """NVIDIA GPUs on the PCI bus: [{"address": "0000:00:05.0", "device": "10de:2330"}]."""
    found, base = [], f"{sysfs}/bus/pci/devices"
    for address in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            vendor, device, pci_class = (open(f"{base}/{address}/{f}").read().strip() for f in ("vendor", "device", "class"))
        except OSError:
            continue
        if vendor == NVIDIA and pci_class[:6] in GPU_CLASSES:
            found.append({"address": address, "device": f"10de:{device[2:].lower()}"})
    return found


def gpu_report(found: list[dict], nvml_binding, *, wait_s: float = DEVICES_WAIT_S) -> dict:
    """{"gpus": [...], "driver": version, "problem": the driver's words or None, "seconds": time taken}. No GPU:
    nothing loaded, "seconds" None. A problem keeps the GPUs as the PCI bus shows them (address, device)."""
    if not found:
        return {"gpus": [], "driver": None, "problem": None, "seconds": None}
    started = time.monotonic()
    try:
        problem = load_driver()
        if problem is None:
            problem = wait_for_devices(len(found), wait_s)
        if problem is None:
            make_device_nodes()
            version, gpus, problem = read_bounded(nvml_binding, NVML_WAIT_S + NVML_PER_GPU_S * len(found))
            if problem is None and len(gpus) < len(found):  # the driver gave up on some (RmInitAdapter failed, ...)
                problem = " | ".join([f"NVML lists {len(gpus)} of the {len(found)} NVIDIA GPUs on the PCI bus",
                                      *kernel_words()])
            if problem is None:
                return {"gpus": gpus, "driver": version, "problem": None,
                        "seconds": round(time.monotonic() - started, 3)}
    except OSError as error:  # the device nodes, /proc: said as the driver's problem, not a crash of PID 1
        problem = f"{error}"
    return {"gpus": found, "driver": None, "problem": problem, "seconds": round(time.monotonic() - started, 3)}


def load_driver() -> str | None:
    """`modprobe nvidia`, then `modprobe nvidia_uvm`: None when both loaded, else modprobe's words and the
    kernel's NVRM lines."""
    started = time.monotonic()
    for module in ("nvidia", "nvidia_uvm"):
        done = subprocess.run(["modprobe", module], capture_output=True, text=True)
        if done.returncode != 0:
            say(f"modprobe {module} failed after {time.monotonic() - started:.2f} s")
            said = " ".join((done.stderr or done.stdout).split()) or f"modprobe {module} exited with {done.returncode}"
            return " | ".join([said, *kernel_words()])
    say(f"NVIDIA driver loaded (modprobe nvidia nvidia_uvm) in {time.monotonic() - started:.2f} s")
    return None


def kernel_words(limit: int = 8) -> list[str]:
    """The kernel's latest lines about the NVIDIA driver (NVRM: ..., nvidia: ...): from /dev/kmsg, which PID 1
    can read without a dmesg, else dmesg."""
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        done = subprocess.run(["dmesg"], capture_output=True, text=True)
        lines = done.stdout.splitlines()
    else:
        try:
            while True:
                try:
                    record = os.read(fd, 8192)
                except BlockingIOError:
                    break  # read to the end
                except BrokenPipeError:
                    continue  # a record was overwritten while we read: go on with the next
                if not record:
                    break
                lines.append(record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])
        finally:
            os.close(fd)
    noise = ("taints kernel", "tainting kernel", "Nvlink Core")  # said on every load, whatever happens
    return [" ".join(line.split()) for line in lines
            if ("NVRM" in line or "nvidia" in line.lower()) and not any(n in line for n in noise)][-limit:]


def wait_for_devices(count: int, within: float) -> str | None:
    """Until the driver lists `count` GPUs in /proc/driver/nvidia/gpus, for at most `within` s."""
    deadline, listed = time.monotonic() + within, []
    while True:
        with contextlib.suppress(OSError):
            listed = os.listdir("/proc/driver/nvidia/gpus")
        if len(listed) >= count:
            return None
        if time.monotonic() > deadline:
            return " | ".join([f"the driver loaded but lists {len(listed)} of {count} GPUs after {within:g} s",
                               *kernel_words()])
        time.sleep(0.05)


def make_device_nodes() -> None:
    """/dev/nvidiactl, /dev/nvidia<minor> per GPU, /dev/nvidia-uvm(-tools): the driver registers character
    devices but makes no nodes (there is no udev in the guest to make them either)."""
    majors = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/devices").read().split("Block devices:")[0].splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit():
                majors[fields[1]] = int(fields[0])
    nvidia = majors.get("nvidia-frontend") or majors.get("nvidia") or NV_MAJOR
    nodes = [("/dev/nvidiactl", nvidia, 255)]
    for gpu in sorted(os.listdir("/proc/driver/nvidia/gpus")) if os.path.isdir("/proc/driver/nvidia/gpus") else []:
        with contextlib.suppress(OSError, ValueError, IndexError):
            information = open(f"/proc/driver/nvidia/gpus/{gpu}/information").read()
            minor = int(information.split("Device Minor:")[1].split()[0])
            nodes.append((f"/dev/nvidia{minor}", nvidia, minor))
    if "nvidia-uvm" in majors:
        nodes += [("/dev/nvidia-uvm", majors["nvidia-uvm"], 0), ("/dev/nvidia-uvm-tools", majors["nvidia-uvm"], 1)]
    for path, major, minor in nodes:
        with contextlib.suppress(FileExistsError):
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)


def nvml_binding():
    """pynvml (nvidia-ml-py) from the image's venv, which `python -S` keeps off sys.path."""
    site = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    if site not in sys.path:
        sys.path.append(site)
    import pynvml

    return pynvml


def read_bounded(binding, within: float) -> tuple[str | None, list[dict], str | None]:
    """`read_gpus` with NVML's first init (every GPU's GSP boot) bounded: (version, GPUs, problem)."""
    result: dict = {}

    def read() -> None:
        try:
            result["version"], result["gpus"] = read_gpus(binding())
        except Exception as error:  # noqa: BLE001 - NVML's own words, whatever it raised
            result["error"] = f"{type(error).__name__}: {error}"

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(within)
    if reader.is_alive():
        return None, [], " | ".join([f"NVML did not answer within {within:g} s", *kernel_words()])
    if "error" in result:
        return None, [], " | ".join([f"NVML: {result['error']}", *kernel_words()])
    return result["version"], result["gpus"], None


def read_gpus(nvml) -> tuple[str, list[dict]]:
    """Each GPU through NVML (pynvml's calls): UUID, name, PCI address and device id, memory, ECC mode; and
    persistence mode turned on. Raises NVML's error when the driver cannot answer."""
    nvml.nvmlInit()
    try:
        version = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            pci = nvml.nvmlDeviceGetPciInfo(handle)
            ids = pci.pciDeviceId  # NVML's (device << 16) | vendor
            gpu = {"address": pci_address(_text(pci.busId)), "device": f"{ids & 0xFFFF:04x}:{ids >> 16:04x}",
                   "name": _text(nvml.nvmlDeviceGetName(handle)), "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                   "memory_mib": nvml.nvmlDeviceGetMemoryInfo(handle).total >> 20}
            try:
                gpu["ecc"] = "on" if nvml.nvmlDeviceGetEccMode(handle)[0] else "off"
            except nvml.NVMLError:
                gpu["ecc"] = "n/a"  # NVML_ERROR_NOT_SUPPORTED: a GPU without ECC
            try:
                nvml.nvmlDeviceSetPersistenceMode(handle, nvml.NVML_FEATURE_ENABLED)
                gpu["persistence"] = True
            except nvml.NVMLError as error:
                gpu["persistence"] = False
                gpu["persistence_error"] = str(error)
            gpus.append(gpu)
        return version, gpus
    finally:
        nvml.nvmlShutdown()


def pci_address(bus_id: str) -> str:
    """NVML's 00000000:3B:00.0 -> sysfs's 0000:3b:00.0."""
    domain, bus, rest = bus_id.lower().split(":")
    return f"{int(domain, 16):04x}:{bus}:{rest}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_summary(report: dict) -> str:
    """The GPUs in one line, for the hello's detail and the serial console."""
    if not report["gpus"] and not report["problem"]:
        return "no NVIDIA GPU"
    if report["problem"]:
        devices = ", ".join(f"{g['device']} at {g['address']}" for g in report["gpus"])
        return f"NVIDIA GPUs {devices}, but the driver did not come up: {report['problem']}"
    kinds: dict = {}
    for gpu in report["gpus"]:
        bits = [gpu["device"]] + ([f"{gpu['memory_mib']} MiB", f"ECC {gpu['ecc']}",
                                   "persistence " + ("on" if gpu["persistence"] else "off")] if "uuid" in gpu else [])
        kinds.setdefault(f"{gpu.get('name', gpu['device'])} ({', '.join(bits)})", []).append(gpu)
    said = "; ".join(f"{len(v)} x {k}" for k, v in kinds.items())
    return f"GPUs: {said}" + (f", driver {report['driver']} in {report['seconds']:.1f} s" if report["driver"] else "")


def gpu_refusal(expected: list[dict], report: dict, machine) -> str | None:
    """Why this node must not go on with its GPUs (None when they are the ones its VM was given and work): the
    driver did not come up, or the GPUs found differ in number or PCI device id, with the driver's words."""
    if report["problem"]:
        return f"GPUs: the driver did not come up: {report['problem']}"
    want = sorted(g["device"] for g in expected)
    have = sorted(g["device"] for g in report["gpus"])
    if want == have:
        return None

    def said(devices: list[str]) -> str:
        return ", ".join(f"{devices.count(d)} x {d}" for d in sorted(set(devices))) or "none"

    words = machine.no_gpu_words() if want and not have else ""
    return (f"GPUs: the node was given {len(want)} ({said(want)}), the guest found {len(have)} ({said(have)})"
            + (f"; the driver says: {words}" if words else ""))


# -- the guest channel --------------------------------------------------------------------------------
class Channel:
    """JSON lines to the host. It reconnects: a new vsock connection (a virtio-serial port is reopened)."""

    def __init__(self, machine: Vm | Hosted) -> None:
        self.machine = machine
        self.conn: socket.socket | int | None = None
        self.buffer = b""
        self.sending = threading.Lock()  # the main thread and the channel's thread both send

    @property
    def fd(self) -> int:
        return self.conn if isinstance(self.conn, int) else self.conn.fileno()

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def connect(self) -> bool:
        try:
            self.conn = self.machine.connect()
        except OSError:
            return False
        self.buffer = b""
        return True

    def close(self) -> None:
        conn, self.conn = self.conn, None
        with contextlib.suppress(OSError):
            if isinstance(conn, int):
                os.close(conn)
            elif conn is not None:
                conn.close()

    def send(self, message: dict) -> None:
        """OSError when the host end is gone."""
        data = json.dumps(message).encode() + b"\n"
        with self.sending:
            if self.conn is None:
                raise ConnectionError("the guest channel is not connected")
            while data:
                if not select.select([], [self.fd], [], 5)[1]:
                    raise TimeoutError("the host end does not read the guest channel")
                try:
                    data = data[os.write(self.fd, data):]
                except BlockingIOError:
                    continue

    def receive(self, timeout: float) -> dict | None:
        """The next message; None after `timeout`. EOFError when the host end is gone. A line that is not a
        JSON object is logged and skipped."""
        deadline = time.monotonic() + timeout
        while True:
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
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict):
                return message
            say(f"skipped a guest channel line that is not a JSON object: {line[:80]!r}")


class Node:
    """The node's life, as the guest sees it; `serve` keeps its channel from the moment the config arrived."""

    def __init__(self, machine: Vm | Hosted, channel: Channel, hello: dict) -> None:
        self.machine, self.channel, self.hello = machine, channel, hello
        self.ready: dict | None = None  # the ready message, once Ray joined: said again after a reconnect
        self.reaping = threading.Event()  # not before `ray start` ended: reaping could take its exit status

    def talk(self, within: float) -> dict:
        """Connect (with backoff) and say hello, until the config arrives; power off after `within` s alone."""
        backoff, since = 0.1, time.monotonic()
        while True:
            if self.machine.vm_gone():
                self.machine.power_off("its VMM is gone")
            if self.channel.connected or self._reconnect():
                try:
                    message = self.channel.receive(2.0)
                except (EOFError, OSError):
                    self.channel.close()
                    message = None
                if message is not None and message.get("op") == "config":
                    return message
                if message is not None and message.get("op") == "stop":
                    self.machine.power_off("told to stop before it was configured")
                if self.channel.connected:
                    since = time.monotonic()
                    continue
            if time.monotonic() - since > within:
                self.machine.power_off(f"no host end on the guest channel for {within:g} s")
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _reconnect(self) -> bool:
        if not self.channel.connect():
            return False
        say("guest channel: connected to the host end" + (" again" if self.ready is not None else ""))
        try:
            self.channel.send(self.hello)
            if self.ready is not None:
                self.channel.send(self.ready)
        except OSError:
            self.channel.close()
            return False
        return True

    def serve(self, reconnect_s: float) -> None:
        """Heartbeats; power off when told to, or when the host end has been gone for `reconnect_s`."""
        gone_since, backoff = None, 0.1
        while True:
            try:
                if self.machine.vm_gone():
                    self.machine.power_off("its VMM is gone")
                if self.reaping.is_set():
                    self.machine.reap()
                if not self.channel.connected and not self._reconnect():
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > reconnect_s:
                        self.machine.power_off(f"the host end has been gone for {reconnect_s:g} s")
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                gone_since, backoff = None, 0.1
                message = self.channel.receive(2.0)
                if message is not None and message.get("op") == "stop":
                    self.machine.power_off("told to stop")
                self.channel.send({"op": "heartbeat"})
            except (EOFError, OSError):
                self.channel.close()
                gone_since = gone_since or time.monotonic()
                say(f"guest channel: the host end went away; reconnecting for up to {reconnect_s:g} s")
            except Exception as error:  # noqa: BLE001 - the dead man's switch must outlive any surprise
                say(f"guest channel: {error!r}")
                time.sleep(0.5)


def start_ray(machine: Vm | Hosted, python: str, ray: dict, env: dict, address: str | None, exact: bool) -> None:
    """`exact`: `python` is the controller's own interpreter (the environment image carries it)."""
    labels = ",".join(f"{k}={v}" for k, v in ray.get("labels", {}).items())
    argv = [*ray_start(python, machine.ports), f"--address={ray['address']}",
            f"--num-cpus={ray.get('num_cpus', 1)}", f"--num-gpus={ray.get('num_gpus', 0)}", f"--labels={labels}",
            "--disable-usage-stats", f"--temp-dir={machine.ray_dir}"]
    argv.append(f"--node-ip-address={address or _toward(ray['address'])}")
    environment = {"PATH": f"{os.path.dirname(python)}:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": os.environ.get("HOME", "/root"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray["token"],
                   **env,
                   # How long the raylet waits for its runtime-env agent (30 s by default), which an emulated
                   # guest (TCG) may need longer to start.
                   "RAY_agent_register_timeout_ms": str(RAYLET_WAIT_S * 1000)}
    if not exact:
        # The image's Python may differ from the controller's in the patch release (Debian's 3.11.x): Ray then
        # compares only major.minor (and warns on each worker: the environment image avoids that by carrying
        # the controller's own interpreter; see the README).
        environment["RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL"] = "minor"
    say(f"ray start: joining {ray['address']} as {ray.get('labels', {}).get('hearth.io/node', '?')}, "
        f"{ray.get('num_cpus', 1)} CPUs, {ray.get('num_gpus', 0)} GPUs")
    started = time.monotonic()
    done = subprocess.run(argv, env=environment, capture_output=True, text=True)
    if done.returncode == 0 and "Ray runtime started" in done.stdout:
        say(f"ray start: the node joined in {time.monotonic() - started:.2f} s")
    else:
        say((done.stdout + done.stderr)[-3000:])
        logs = f"{machine.ray_dir}/session_latest/logs"
        for log in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            if log.startswith("raylet") or log.endswith(".err"):
                with contextlib.suppress(OSError):
                    say(f"--- {log}:\n" + open(f"{logs}/{log}", errors="replace").read()[-2000:])
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise RuntimeError(f"ray start exited with status {done.returncode}: "
                           + (" | ".join(lines[-4:]) if lines else "it printed nothing"))


def main() -> None:
    machine = where()
    started = machine.uptime()
    me = machine.node_id()
    machine.set_hostname(me)
    looking = time.monotonic()
    gpus = machine.gpus()
    looked = time.monotonic() - looking
    channel = Channel(machine)
    summary = gpu_summary(gpus) + (f" ({looked:.3f} s to look)" if not gpus["gpus"] else "")
    phases = {"kernel_s": started, "agent_s": machine.uptime(),
              **({"gpu_s": gpus["seconds"]} if gpus["seconds"] is not None else {})}
    hello = {"op": "hello", "node": me, "detail": f"guest agent up {started:.2f} s after the kernel started; {summary}",
             "phases": phases, "gpus": gpus["gpus"], "gpu_driver": gpus["driver"], "gpu_problem": gpus["problem"]}
    node = Node(machine, channel, hello)
    say(f"node {me}, up {started:.2f} s after the kernel started; {summary}")
    config = node.talk(within=ALONE_S)
    configured = machine.uptime()
    say("config: " + (f"address {config['network']['address']}" if config.get("network") else "no network to set"))
    threading.Thread(target=node.serve, args=(float(config.get("reconnect_s", 30)),), daemon=True).start()
    env_image, python, env_s = config.get("env_image"), machine.python, 0.0
    try:
        refusal = gpu_refusal(config.get("gpus") or [], gpus, machine)
        if refusal:
            raise RuntimeError(refusal)
        address = machine.configure_network(config.get("network") or {})
        if env_image:
            mounting = time.monotonic()
            python = machine.mount_env(env_image)
            env_s = time.monotonic() - mounting
            say(f"environment {env_image['key'][:12]} mounted in {env_s:.2f} s: Ray runs on {python}")
        ray = {**config["ray"], "num_gpus": len(gpus["gpus"])}  # the GPUs it has (and was given, checked above)
        start_ray(machine, python, ray, config.get("env") or {}, address,
                  exact=bool(env_image) and env_image.get("interpreter") == "shipped")
    except Exception as error:  # noqa: BLE001 - whatever it is, the host hears why before the VM goes
        say(f"failed: {error}")
        with contextlib.suppress(OSError):
            channel.send({"op": "failed", "detail": str(error)})
        time.sleep(0.5)  # let the host read it before the VM (and the channel) goes
        machine.power_off(str(error))
    node.reaping.set()
    node.ready = {"op": "ready", "phases": {"config_s": configured, "ray_s": machine.uptime(),
                                            **({"env_s": round(env_s, 3)} if env_image else {})}}
    with contextlib.suppress(OSError):
        channel.send(node.ready)
    threading.Event().wait()  # the channel's thread runs the node from here


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - PID 1 must not just die: say why, then power off
        import traceback

        traceback.print_exc()
        say(f"failed: {error!r}")
        if os.getpid() == 1:
            Vm.power_off("the guest agent failed")
        raise SystemExit(1) from None
