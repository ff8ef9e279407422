"""`cloud-hypervisor-standin`: a STAND-IN for the cloud-hypervisor binary, for machines that cannot run it.

It is not a VMM and boots nothing. It takes the same flags (`--api-socket path=|fd=`, `--event-monitor
path=|fd=`, `--log-file`, `--seccomp`, `-v`, `--no-shutdown`), serves the same API on the same socket
(with CH's `<socket>.lock` beside it), and:

- validates every request body against the schema the spec names for its endpoint, strictly, and every
  response body it sends; follows CH's state rules and status mapping (vmm/src/api/http/mod.rs: VM not
  created -> 404, bad JSON -> 400, unknown path -> 404, the rest -> 500, bodies are the error chain);
- checks at `vm.create` what CH's own config validation refuses beyond the schema (vmm/src/config.rs,
  VmConfig::validate: PCI segments in range, NUMA nodes and memory zones used once, hugepage sizes), and at
  `vm.boot` what CH would trip over: payload and disk files exist, memory zones exactly when `size` is 0 and
  every zone a NUMA node names exists (memory_manager.rs, vm.rs), each VFIO device is a sysfs device bound to
  vfio-pci whose `/dev/vfio/<group>` exists (under the tree its path names);
- writes `--event-monitor` events in CH's format (pretty JSON objects, blank line between);
- takes the boot's time from a latency distribution, and injects faults on request;
- runs a guest program as a subprocess once booted, its stdout and stderr going to the serial file, with
  vsock done as CH does it on the host side: the guest reaches the host at `<vsock socket>_<port>`.
  A guest program that exits is a guest poweroff: without `--no-shutdown` the process then ends. The guest
  "sees" the NVIDIA GPUs among the VFIO devices (their vendor:device read from sysfs): HEARTH_GUEST_GPUS, a JSON
  list of {"address" (its guest-side address), "device"}, tells a guest program; the builtin guest reports them.

Stand-in settings come from the environment variable HEARTH_STANDIN, a JSON object:
    boot_s          seconds, or {"median", "sigma", "straggler_p", "straggler_x"}: log-normal boot time
                    with a fraction straggler_p of boots straggler_x times slower (default 0.05)
    seed            for the latency draw (default: random)
    fault           one of FAULTS, or none (an unknown name stops the stand-in before it serves):
                      "boot-fails"      vm.boot answers CH's error for vCPUs that do not start
                      "crash-mid-boot"  the process exits (status 101) half-way through vm.boot
                      "hang:<endpoint>" that endpoint (e.g. vm.create) never answers
                      "slow-boot"       vm.boot takes slow_x times as long
                      "ignore-sigterm"  a wedged VMM: SIGTERM and the power button do nothing, and it stays up
                                        when its guest powers off; only SIGKILL ends it
                      "silent-guest"    the builtin guest never connects: the VM boots, no hello ever comes
                      "garbage-guest"   the builtin guest first sends what no guest agent would (an oversized
                                        line, bytes that are not UTF-8, JSON that is not an object, unknown
                                        ops, a ready before its hello, more connections than a guest needs),
                                        then behaves
    slow_x          how much slower "slow-boot" is (default 20)
    guest           what runs once the VM booted: "agent" (hearth's real guest agent, guest/agent.py, run on
                    this host in its hosted mode: vsock as CH maps it to Unix sockets, no mounts, no network
                    changes, and its "power off" ends its own process group), "builtin" (a simulated guest
                    agent inside the stand-in, light enough for many VMs' worth of stand-ins on one machine:
                    the benchmarks), or the argv of a guest program (default: none; the guest idles until
                    powered off). Whatever it is lives in a process group of its own, which ends with the VM.
    guest_tmp       where the "agent" guest's own disk (its Ray's files) is made, as hg-* (default /tmp)
    join_s          the builtin guest's time from hello to ready, as a Ray join would take (default 0)
    poweroff_after  the builtin guest powers off this many seconds after it joined (default: never)
    version         what vmm.ping reports (default "v53.0")
    validate        check every request and response against the spec (default true). false is the bench
                    mode: the same API, states and events, without the schema validator, whose import and
                    checks would otherwise make each stand-in cost far more CPU than a native VMM, so that
                    hundreds of them on a small machine measure hearth's control plane, not the stand-in.
                    Tests keep the default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import select
import socket
import socketserver
import sys
import threading
import time

TYPE_CHECKING = False  # typing and pathlib are not imported: each costs a stand-in start 5-10 ms of CPU
if TYPE_CHECKING:
    from typing import Any

# Only the standard library's small modules at the top: hundreds of stand-ins start at once in a benchmark.
# What only a guest program needs (subprocess, tempfile, shutil, importlib) is imported when one starts; the API
# is served by a few lines over socketserver rather than http.server, which pulls in email, ssl and http.client.

# jsonschema imports every optional format checker it can find; where jupyter's extras are installed the
# "iri" grammar (rfc3987_syntax) alone takes 1.3 s to import, paid by every VMM start. The CH spec uses no
# such format, and this process is the stand-in's own: skip it.
sys.modules.setdefault("rfc3987_syntax", None)

from provisioner.ch.monitor import format_event  # noqa: E402

API_ROOT = "/api/v1"  # as provisioner.ch.spec has it; that module is imported only when validating
HEARTBEAT_S = 2.0  # as the real guest agent (guest/agent.py) sends them
ALONE_S = 60.0  # as long as the real guest agent waits to be configured (guest/agent.py ALONE_S)

VM_NOT_CREATED = "VM is not created"
FAULTS = ("boot-fails", "crash-mid-boot", "hang:<endpoint>", "slow-boot", "ignore-sigterm", "silent-guest",
          "garbage-guest")


class ApiError(Exception):
    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(chain)
        self.status, self.chain = status, list(chain)


class StandIn:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.started = time.monotonic()
        self.settings = settings
        self.no_shutdown = args.no_shutdown
        self.lock = threading.RLock()
        self.state: str | None = None
        self.config: dict[str, Any] | None = None
        self.guest: Any = None  # a subprocess.Popen, or a _BuiltinGuest
        self.rng = random.Random(settings.get("seed"))
        self.events = _open_target(args.event_monitor, "w") if args.event_monitor else None
        self.log = open(args.log_file, "a") if args.log_file else sys.stderr
        self.fault = settings.get("fault")
        self.guest_disk: str | None = None
        self.ending = threading.Lock()  # the guest's watcher and a stop both end it: one at a time, wholly
        self.exiting = threading.Event()

    # -- events and log --------------------------------------------------------------------------
    def event(self, source: str, event: str, properties: dict[str, Any] | None = None) -> None:
        if self.events is not None:
            try:
                self.events.write(format_event(time.monotonic() - self.started, source, event, properties))
                self.events.flush()
            except BrokenPipeError:  # the reader went away (the controller is gone or has stopped us)
                self.events = None

    def say(self, message: str) -> None:
        self.log.write(f"cloud-hypervisor-standin: {message}\n")
        self.log.flush()

    def exit(self, code: int = 0) -> None:
        """End the guest, then the process. Once: a second call (the SIGTERM that `terminate` sends the process
        after its group, run as a nested handler; a guest powering off meanwhile) returns at once, and the first
        finishes the job (a nested exit had cut the first short, leaving the guest's disk behind)."""
        if self.exiting.is_set():
            return
        self.exiting.set()
        self._stop_guest()
        self.event("vmm", "shutdown")
        self.say(f"exiting with status {code}")
        os._exit(code)

    # -- the API ---------------------------------------------------------------------------------
    def handle(self, method: str, endpoint: str, body: Any) -> tuple[int, Any]:
        if self.fault == f"hang:{endpoint}":
            self.say(f"fault injected: {endpoint} hangs")
            threading.Event().wait()
        handler = getattr(self, f"{method.lower()}_{endpoint.replace('.', '_').replace('-', '_')}", None)
        if handler is None:
            raise ApiError(500, "Error from API", f"{endpoint} is not implemented by the hearth stand-in")
        with self.lock:  # CH's VMM thread serves one request at a time: vm.info waits for vm.boot too
            return handler(body)

    def serves(self, method: str, endpoint: str) -> bool:
        """Whether the stand-in implements this endpoint (the bench mode's routing, without the spec)."""
        return hasattr(self, f"{method.lower()}_{endpoint.replace('.', '_').replace('-', '_')}")

    def get_vmm_ping(self, _: Any) -> tuple[int, Any]:
        return 200, {"version": self.settings.get("version", "v53.0"), "build_version": "hearth-standin",
                     "pid": os.getpid(), "features": ["kvm"]}

    def put_vm_create(self, body: Any) -> tuple[int, Any]:
        if self.state is not None:
            raise ApiError(500, "Error from API", "The VM could not be created", "VM is already created")
        problem = _invalid(body)
        if problem:
            raise ApiError(400, "Error from API", "The VM could not be created", "Error validating configuration",
                           problem)
        self.config, self.state = body, "Created"
        return 204, None

    def get_vm_info(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM info is not available")
        return 200, {"config": self.config, "state": self.state, "memory_actual_size": self.config.get("memory", {}).get("size", 512 << 20)}

    def get_vm_counters(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM counters are not available")
        return 200, {}

    def put_vm_boot(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM could not boot")
        if self.state not in ("Created", "Shutdown"):
            raise ApiError(500, "Error from API", "The VM could not boot", "VM is already booted")
        self._check_boot()
        self.event("vm", "booting")
        delay = self._boot_delay()
        self.say(f"booting: {delay:.3f} s")
        if self.fault == "crash-mid-boot":
            time.sleep(delay / 2)
            self.say("fault injected: crash in the middle of vm.boot")
            os._exit(101)
        time.sleep(delay)
        if self.fault == "boot-fails":
            raise ApiError(500, "Error from API", "The VM could not boot", "Error starting VM",
                           "Failed to start vCPUs (fault injected by the stand-in)")
        self.state = "Running"
        self.event("vm", "booted")
        self._start_guest()
        return 204, None

    def put_vm_power_button(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM could not be powered off")
        self._need_running("The VM could not be powered off")
        self.say("power button pressed")
        if self.fault == "ignore-sigterm":
            self.say("fault injected: the VMM is wedged, the power button does nothing")
        elif self.guest is not None:
            self.guest.send_signal(signal.SIGTERM)  # the guest's ACPI handler: a clean shutdown
        else:
            threading.Timer(0.05, self._guest_gone, args=(0,)).start()
        return 204, None

    def put_vm_shutdown(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM could not shut down")
        self._need_running("The VM could not shut down")
        self._stop_guest()
        self.state = "Shutdown"
        self.event("vm", "shutdown")
        return 204, None

    def put_vm_pause(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM could not pause")
        self._need_running("The VM could not pause")
        self.state = "Paused"
        self.event("vm", "paused")
        return 204, None

    def put_vm_resume(self, _: Any) -> tuple[int, Any]:
        self._need_vm("The VM could not resume")
        if self.state != "Paused":
            raise ApiError(500, "Error from API", "The VM could not resume", "VM is not paused")
        self.state = "Running"
        self.event("vm", "resumed")
        return 204, None

    def put_vm_delete(self, _: Any) -> tuple[int, Any]:
        self._stop_guest()
        if self.state is not None:
            self.state, self.config = None, None
            self.event("vm", "deleted")
        return 204, None

    def put_vmm_shutdown(self, _: Any) -> tuple[int, Any]:
        self._stop_guest()
        threading.Timer(0.05, self.exit).start()
        return 204, None

    # -- the simulated VM ------------------------------------------------------------------------
    def _need_vm(self, what: str) -> None:
        if self.state is None:
            raise ApiError(404, "Error from API", what, VM_NOT_CREATED)

    def _need_running(self, what: str) -> None:
        if self.state not in ("Running", "Paused"):
            raise ApiError(500, "Error from API", what, "VM is not booted")

    def _check_boot(self) -> None:
        config = self.config
        payload = config["payload"]
        for key in ("kernel", "initramfs", "firmware"):
            if key in payload and not os.path.isfile(payload[key]):
                raise ApiError(500, "Error from API", "The VM could not boot", "Error loading kernel",
                               f"Cannot open {key} {payload[key]}: No such file or directory (os error 2)")
        if "kernel" not in payload and "firmware" not in payload:
            raise ApiError(500, "Error from API", "The VM could not boot", "No kernel or firmware in the payload")
        for disk in config.get("disks", []):
            if not os.path.exists(disk.get("path", "")):
                raise ApiError(500, "Error from API", "The VM could not boot", "Error creating disk",
                               f"Failed to open disk image {disk.get('path')}: No such file or directory (os error 2)")
        problem = _memory_problem(config)
        if problem:
            raise ApiError(500, "Error from API", "The VM could not boot", "Error creating memory manager", problem)
        for device in config.get("devices", []):
            problem = _vfio_problem(device.get("path", ""))
            if problem:
                raise ApiError(500, "Error from API", "The VM could not boot", "Error creating VFIO device", problem)
        vsock = config.get("vsock")
        if vsock and not os.path.isdir(os.path.dirname(vsock["socket"])):
            raise ApiError(500, "Error from API", "The VM could not boot", "Error creating vsock device",
                           f"Cannot bind {vsock['socket']}: No such file or directory (os error 2)")

    def _boot_delay(self) -> float:
        return boot_delay(self.settings, self.rng)

    def _start_guest(self) -> None:
        argv = self.settings.get("guest")
        if not argv:
            return
        config = self.config
        if argv == "builtin":
            self.guest = _BuiltinGuest(self, config, float(self.settings.get("join_s", 0)),
                                       float(self.settings.get("poweroff_after", 1e9)))
            self.guest.start()
            threading.Thread(target=self._watch_guest, args=(self.guest,), daemon=True).start()
            return
        import importlib.util
        import subprocess
        import tempfile

        env = dict(os.environ)
        env.pop("HEARTH_STANDIN", None)
        oem = config.get("platform", {}).get("oem_strings", [])
        env["HEARTH_SMBIOS_OEM"] = "\n".join(oem)
        env["HEARTH_SMBIOS_UUID"] = config.get("platform", {}).get("system_uuid", "")
        if config.get("vsock"):
            env["HEARTH_VSOCK_SOCKET"] = config["vsock"]["socket"]
            env["HEARTH_VSOCK_CID"] = str(config["vsock"]["cid"])
        env["HEARTH_GUEST_GPUS"] = json.dumps(passed_gpus(config))
        if argv == "agent":
            # The guest agent on a host: only this variable makes it run anywhere but as a VM's PID 1, and
            # then it acts on nothing but its own processes (see guest/agent.py, `Hosted`).
            argv = [sys.executable, importlib.util.find_spec("guest.agent").origin]
            env["HEARTH_GUEST_HOSTED"] = config["vsock"]["socket"]
            env["HEARTH_GUEST_BOOTED_AT"] = repr(time.time())
            # the VM's own disk: gone with the VM (short: Ray's socket paths live under it)
            self.guest_disk = tempfile.mkdtemp(prefix="hg-", dir=self.settings.get("guest_tmp", "/tmp"))
            env["HEARTH_GUEST_TMP"] = self.guest_disk
        serial = config.get("serial", {})
        out = open(serial["file"], "ab") if serial.get("mode") == "File" else subprocess.DEVNULL
        self.guest = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        self.say(f"guest program started: pid {self.guest.pid}")
        threading.Thread(target=self._watch_guest, args=(self.guest,), daemon=True).start()

    def _watch_guest(self, guest) -> None:
        code = guest.wait()
        self._end_guest(guest)
        if self.guest is guest:  # it ended by itself (poweroff), not by _stop_guest
            self._guest_gone(code)

    def _guest_gone(self, code: int) -> None:
        self.say(f"guest powered off (guest program exit status {code})")
        with self.lock:
            self.state = "Shutdown"
            self.guest = None
        self.event("vm", "shutdown")
        if self.fault == "ignore-sigterm":
            self.say("fault injected: the VMM is wedged, it does not end with its guest")
        elif not self.no_shutdown:
            self.exit(0)

    def _stop_guest(self) -> None:
        """The VM ends: everything that ran in it goes (a guest program's whole process group)."""
        guest, self.guest = self.guest, None
        if guest is not None:
            guest.kill()
            guest.wait()
            self._end_guest(guest)

    def _end_guest(self, guest) -> None:
        """The VM is off: nothing that ran in it outlives it, and its disk goes. The watcher of a guest that
        powered off and a stop that came meanwhile both call this: the lock makes the second wait for the
        first, so the exit that follows a stop cannot cut a removal short."""
        import shutil

        with self.ending:
            if not isinstance(guest, _BuiltinGuest):  # a guest program's process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(guest.pid, signal.SIGKILL)
            if self.guest_disk is not None:
                shutil.rmtree(self.guest_disk, ignore_errors=True)
                if not os.path.exists(self.guest_disk):
                    self.guest_disk = None


class _BuiltinGuest(threading.Thread):
    """A simulated guest agent, for many stand-ins on one machine. Offers what the stand-in uses of Popen."""

    def __init__(self, vmm: StandIn, config: dict[str, Any], join_s: float, poweroff_after: float) -> None:
        super().__init__(daemon=True)
        self.vmm, self.config, self.join_s, self.poweroff_after = vmm, config, join_s, poweroff_after
        self.halt = threading.Event()

    def run(self) -> None:
        """hello, config, (join_s) ready, heartbeats. When the host end goes away, reconnect for the
        config's `reconnect_s` (a host agent restarting) and say hello again; else power off."""
        oem = dict(s.split("=", 1) for s in self.config.get("platform", {}).get("oem_strings", []) if "=" in s)
        path = self.config["vsock"]["socket"] + "_1024"
        gpus = passed_gpus(self.config)
        hello = {"op": "hello", "node": oem.get("hearth-node"), "gpus": gpus,
                 "detail": f"stand-in guest, {len(gpus)} simulated GPUs" if gpus else "stand-in guest"}
        joined, config, deadline = False, {}, None
        if self.vmm.fault == "silent-guest":
            self.vmm.say("fault injected: the guest never says hello")
            self.halt.wait()
            return
        if self.vmm.fault == "garbage-guest":
            self._garbage(path)
        while not self.halt.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(path)
                    stream = sock.makefile("rwb")
                    self._send(stream, hello)
                    config = json.loads(stream.readline() or b"{}")
                    if not joined:
                        if self.halt.wait(self.join_s):
                            return
                        joined = True
                        deadline = time.monotonic() + self.poweroff_after
                    self._send(stream, {"op": "ready"})
                    while not self.halt.is_set() and time.monotonic() < deadline:
                        if select.select([sock], [], [], HEARTBEAT_S)[0]:
                            line = stream.readline()
                            if not line:
                                break  # the host end is gone
                            if json.loads(line).get("op") == "stop":
                                return  # told to stop: power off
                        else:
                            self._send(stream, {"op": "heartbeat"})
                    else:
                        return
            except OSError as error:
                self.vmm.say(f"builtin guest: guest channel {path}: {error}")
            # Before its config, it waits for a host end as the real agent does (a host agent restarting
            # before the guest reached it); after, for the config's `reconnect_s`.
            if not self._reconnect(path, float(config.get("reconnect_s", 0)) if config else ALONE_S):
                return

    def _reconnect(self, path: str, within: float) -> bool:
        """Wait until the host end listens again, for at most `within` seconds."""
        until = time.monotonic() + within
        while time.monotonic() < until and not self.halt.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    time.sleep(0.2)
                    continue
            return True
        return False

    def _garbage(self, path: str) -> None:
        """What no guest agent sends, each of which the host end of the channel must skip, and stay up."""
        self.vmm.say("fault injected: the guest sends garbage first")
        lines = (b"\xff\xfe\x00 not UTF-8, not JSON\n[1, 2, 3]\n\"a string\"\nnull\n{\"op\": 42}\n"
                 b"{\"op\": \"ready\"}\n{\"op\": \"launch-missiles\"}\n{\"op\": \"heartbeat\"\n")
        for payload in (lines, b"x" * ((1 << 20) + 16)):  # the second: a line over the channel's cap
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2.0)
                with contextlib.suppress(OSError):
                    sock.recv(1)  # the host closes it (the cap) or ignores it: either way, on
        extra = []
        for _ in range(8):  # more connections than a guest needs, all at once
            with contextlib.suppress(OSError):
                extra.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                extra[-1].connect(path)
        time.sleep(0.2)
        for sock in extra:
            sock.close()
        time.sleep(0.3)  # the host end notices they went

    @staticmethod
    def _send(stream, message: dict[str, Any]) -> None:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()

    def send_signal(self, sig: int) -> None:
        self.halt.set()

    def kill(self) -> None:
        self.halt.set()

    def wait(self) -> int:
        self.join()
        return 0


def boot_delay(settings: dict[str, Any], rng: random.Random | None = None) -> float:
    """The boot time these settings give: `rng` as the stand-in seeds it (from `seed`) unless given. Pure, so
    a benchmark knows each seed's draw before it boots anything (and can check a boot took at least that)."""
    rng = rng or random.Random(settings.get("seed"))
    boot = settings.get("boot_s", 0.05)
    if isinstance(boot, dict):
        delay = boot["median"] * math.exp(rng.gauss(0, boot.get("sigma", 0.25)))
        if rng.random() < boot.get("straggler_p", 0.05):
            delay *= boot.get("straggler_x", 3.0)
    else:
        delay = float(boot)
    if settings.get("fault") == "slow-boot":
        delay *= settings.get("slow_x", 20)
    return delay


def passed_gpus(config: dict[str, Any]) -> list[dict[str, str]]:
    """The NVIDIA GPUs among the VM's VFIO devices, as its guest would see them: on their PCI segment, one
    device slot each, with the vendor:device the host's sysfs gives them."""
    gpus, slots = [], {}
    for device in config.get("devices", []):
        base = device.get("path", "").rstrip("/")
        try:
            vendor, ident, pci_class = (_read(os.path.join(base, f)) for f in ("vendor", "device", "class"))
        except OSError:
            continue
        if vendor != "0x10de" or pci_class[:6] not in ("0x0300", "0x0302"):
            continue
        segment = int(device.get("pci_segment", 0))
        slots[segment] = slots.get(segment, 0) + 1
        gpus.append({"address": f"{segment:04x}:00:{slots[segment]:02x}.0", "device": f"10de:{ident[2:]}"})
    return gpus


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _invalid(config: dict[str, Any]) -> str | None:
    """What CH's VmConfig::validate refuses beyond the schema, among what hearth sends; None if nothing."""
    segments = config.get("platform", {}).get("num_pci_segments", 1)
    memory = config.get("memory", {})
    for where in [memory, *memory.get("zones", [])]:
        if "hugepage_size" in where and not where.get("hugepages"):
            return "Huge page size specified but huge pages not enabled"
        if where.get("hugepage_size", 1) & (where.get("hugepage_size", 1) - 1):
            return f"Huge page size is not power of 2: {where['hugepage_size']}"
    for device in [*config.get("devices", []), *config.get("disks", []), *config.get("net", [])]:
        if device.get("pci_segment", 0) >= segments:
            return f"Invalid PCI segment id: {device['pci_segment']}"
    for segment in config.get("pci_segments", []):
        if segment["pci_segment"] >= segments:
            return f"Invalid PCI segment id: {segment['pci_segment']}"
        if not segment.get("mmio32_aperture_weight", 1) or not segment.get("mmio64_aperture_weight", 1):
            return "Invalid PCI segment aperture weight: 0"
    zones_seen, segments_seen, nodes_seen = {}, {}, set()
    for node in config.get("numa", []):
        number = node["guest_numa_id"]
        if node.get("cpus") == [] or node.get("memory_zones") == []:
            return f"Invalid NUMA configuration: empty list in guest NUMA node {number}"
        for zone in node.get("memory_zones", []):
            if zone in zones_seen:
                return f"Memory zone {zone} reused by NUMA nodes {zones_seen[zone]} and {number}"
            zones_seen[zone] = number
        for segment in node.get("pci_segments", []):
            if segment >= segments:
                return f"Invalid PCI segment id: {segment}"
            if segment == 0 and number != 0:
                return f"Default PCI segment assigned to non-default NUMA node {number}"
            if segment in segments_seen:
                return f"PCI segment {segment} reused by NUMA nodes {segments_seen[segment]} and {number}"
            segments_seen[segment] = number
        nodes_seen.add(number)
    ids = [z["id"] for z in memory.get("zones", [])]
    if len(set(ids)) != len(ids):
        return "Identifier is not unique"
    return None


def _memory_problem(config: dict[str, Any]) -> str | None:
    """What CH's memory manager and NUMA setup refuse at boot, among what hearth sends."""
    memory = config.get("memory", {})
    zones = memory.get("zones")
    if memory.get("size") == 0 and not zones:
        return "User defined memory regions must be provided if the memory size is 0"
    if memory.get("size", 0) != 0 and zones is not None:
        return "User defined memory regions can't be provided if the memory size is not 0"
    names = {z["id"] for z in zones or []}
    for node in config.get("numa", []):
        for zone in node.get("memory_zones", []):
            if zone not in names:
                return f"Unknown memory zone '{zone}'"
        for cpu in node.get("cpus", []):
            if cpu >= config.get("cpus", {}).get("max_vcpus", 1):
                return f"Invalid NUMA configuration: vCPU {cpu} does not exist"
    for zone in zones or []:
        if zone.get("hugepages") and zone["size"] % zone.get("hugepage_size", 2 << 20):
            return f"memory zone {zone['id']}: size is not a multiple of its hugepage size"
    return None


def _vfio_problem(path: str) -> str | None:
    """What CH would fail on when opening a VFIO device at this sysfs path, or None."""
    device = path.rstrip("/")
    if not os.path.isdir(device):
        return f"Failed to open VFIO device {path}: No such file or directory (os error 2)"
    link = os.path.join(device, "driver")
    driver = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    if driver != "vfio-pci":
        return f"{path} is bound to {driver or 'no driver'}, not vfio-pci: failed to get the VFIO group"
    group = os.path.basename(os.readlink(os.path.join(device, "iommu_group")))
    root = device.split("/sys/bus/pci/devices/")[0] or "/"
    if not os.path.exists(os.path.join(root, "dev/vfio", group)):
        return f"Failed to open VFIO group /dev/vfio/{group}: No such file or directory (os error 2)"
    return None


def _check_fault(fault: Any) -> None:
    """Refuse a fault the stand-in does not know (a typo would otherwise boot a healthy VM)."""
    if fault is None or fault in FAULTS:
        return
    if isinstance(fault, str) and fault.startswith("hang:"):
        from provisioner.ch import spec

        method_and_name = [(m, fault[5:]) for m in ("GET", "PUT")]
        for method, name in method_and_name:
            with contextlib.suppress(KeyError):
                spec.endpoint(method, name)
                return
        raise SystemExit(f"cloud-hypervisor-standin: fault {fault!r}: the spec has no endpoint {fault[5:]!r} "
                         "(e.g. hang:vm.create)")
    raise SystemExit(f"cloud-hypervisor-standin: unknown fault {fault!r} in HEARTH_STANDIN: use one of "
                     + ", ".join(FAULTS))


def _open_target(value: str, mode: str):
    kind, _, target = value.partition("=")
    if kind == "fd":
        return os.fdopen(int(target), mode, buffering=1)
    if kind == "path":
        return open(target, mode, buffering=1)
    raise SystemExit(f"cloud-hypervisor-standin: expected path=... or fd=..., got {value!r}")


REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error"}


def _handler(vmm: StandIn) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        """HTTP/1.1 as CH's API speaks it to its clients: a request line, headers, a Content-Length body, a JSON
        answer with its length; connections are kept alive until the client closes them."""

        def handle(self) -> None:
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    return
                parts = line.decode("latin-1").split()
                if len(parts) != 3:
                    self._reply(400, ["Bad Request"])
                    return
                method, self.path, version = parts
                self.headers: dict[str, str] = {}
                while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    status, body = self._route(method, raw)
                except ApiError as error:
                    status, body = error.status, error.chain
                vmm.say(f'api: "{method} {self.path} {version}" {status}')
                self._reply(status, body)
                if version == "HTTP/1.0" or self.headers.get("connection", "").lower() == "close":
                    return

        def _route(self, method: str, raw: bytes) -> tuple[int, Any]:
            path = self.path.split("?", 1)[0]
            if not path.startswith(API_ROOT + "/"):
                raise ApiError(404, "Not Found")
            endpoint = path[len(API_ROOT) + 1:]
            if self.headers.get("x-hearth-deadline"):  # real CH skips it; here it shows the boot budget arrived
                vmm.say(f"{endpoint}: the client waits up to {self.headers['x-hearth-deadline']} s")
            validate = vmm.settings.get("validate", True)
            if validate:
                self._check_route(method, endpoint)
            body = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as error:
                    raise ApiError(400, "Failed to deserialize JSON", str(error)) from None
            if validate:
                self._check_request(method, endpoint, body)
            elif not vmm.serves(method, endpoint):
                raise ApiError(404, "Not Found")
            status, reply = vmm.handle(method, endpoint, body)
            if validate:
                from provisioner.ch import spec

                response_schema = spec.response_schema(method, endpoint, status)
                if response_schema is not None:
                    problems = spec.errors(response_schema, reply)
                    if problems:  # the stand-in's own bug: say so loudly rather than answer off-contract
                        raise ApiError(500, "hearth stand-in produced an off-spec response", *problems)
            return status, reply

        @staticmethod
        def _check_route(method: str, endpoint: str) -> None:
            from provisioner.ch import spec

            try:
                spec.endpoint(method, endpoint)
            except KeyError:
                if f"/{endpoint}" in spec.spec()["paths"]:
                    raise ApiError(400, "Bad Request") from None
                raise ApiError(404, "Not Found") from None

        @staticmethod
        def _check_request(method: str, endpoint: str, body: Any) -> None:
            from provisioner.ch import spec

            schema = spec.request_schema(method, endpoint)
            if schema is not None:
                if body is None:
                    raise ApiError(400, "Bad Request", f"{endpoint} needs a {schema} body")
                problems = spec.errors(schema, body)
                if problems:
                    vmm.say(f"rejected {endpoint}: {problems}")
                    raise ApiError(400, "Failed to deserialize JSON", f"{schema}: " + "; ".join(problems))

        def _reply(self, status: int, body: Any) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.wfile.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nServer: Cloud Hypervisor API\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            self.wfile.flush()

    return Handler


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor-standin", description=__doc__.split("\n\n")[0])
    # Real cloud-hypervisor prints "cloud-hypervisor v53.0" (`-V`/`--version`); the stand-in says what it is.
    parser.add_argument("-V", "--version", action="version", version="cloud-hypervisor-standin v53.0 (hearth stand-in)")
    parser.add_argument("--api-socket", required=True)
    parser.add_argument("--event-monitor")
    parser.add_argument("--log-file")
    parser.add_argument("--seccomp", default="true")
    parser.add_argument("--no-shutdown", action="store_true")
    parser.add_argument("-v", action="count", default=0)
    args = parser.parse_args(argv)
    settings = json.loads(os.environ.get("HEARTH_STANDIN") or "{}")
    _check_fault(settings.get("fault"))
    vmm = StandIn(args, settings)
    vmm.event("vmm", "starting")
    kind, _, target = args.api_socket.partition("=")
    if kind != "path":
        raise SystemExit("cloud-hypervisor-standin: only --api-socket path=... is supported")
    lock = open(target + ".lock", "w")  # CH holds <socket>.lock while it serves the socket
    if os.path.exists(target):
        os.unlink(target)
    server = _Server(target, _handler(vmm))
    vmm.say(f"serving the API on {target} (seccomp={args.seccomp} is not applied by the stand-in)")
    if vmm.fault == "ignore-sigterm":
        signal.signal(signal.SIGTERM, lambda *_: vmm.say("fault injected: SIGTERM ignored"))
    else:
        signal.signal(signal.SIGTERM, lambda *_: vmm.exit(0))  # CH exits cleanly on SIGTERM
    try:
        server.serve_forever(poll_interval=1.0)  # it only checks for shutdown(), which the stand-in never calls
    finally:
        lock.close()


if __name__ == "__main__":
    main()
