"""Moving devices between host drivers and vfio-pci, a whole IOMMU group at a time, or not at all.

Deciding and acting are separate. `plan_bind` / `plan_unbind` read the host and either refuse (with every
reason, before anything is written) or return a `Plan`: per device, the exact sysfs writes. `apply` then
runs them with the kernel's deterministic sequence (Williamson, libvir-list msg96087):

    1. driver_override <- vfio-pci   only vfio-pci may bind from now on
    2. drivers/<current>/unbind      release it from the host driver
    3. drivers_probe                 the kernel binds it to the override

Each write runs with a timeout, because an nvidia unbind waits for the device's users and can block
forever. After each device the result is verified. On any failure every device already touched is put back
on the driver (and override) it had, and the result says what happened to each.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from types import ModuleType
from typing import Literal

from pydantic import BaseModel

from vfio.errors import BindFailed, BindRefused
from vfio.address import parse_address
from vfio.holders import holders, nvidia_minor
from vfio.hostroot import HostRoot
from vfio.nvml import nvml_inventory
from vfio.pci import VFIO_DRIVER, PciDevice, PciTopology, read_device

TIMEOUT = 10.0
PROBE_SETTLE_S = 1.0  # how long an unbound device is given to be claimed by a host driver after drivers_probe
DEVICES = "sys/bus/pci/devices"
DRIVERS = "sys/bus/pci/drivers"


class Write(BaseModel, frozen=True):
    path: str
    value: str

    def __str__(self) -> str:
        return f"echo {self.value} > {self.path}" if self.value else f"echo > {self.path}"


class Step(BaseModel, frozen=True):
    device: PciDevice
    target: str | None  # the driver it must end on; None: any but vfio-pci (whatever the kernel probes)
    writes: list[Write]


class Plan(BaseModel, frozen=True):
    action: Literal["bind", "unbind"]
    steps: list[Step]
    unchanged: list[PciDevice]
    notes: list[str] = []

    @property
    def devices(self) -> list[PciDevice]:
        return [*(s.device for s in self.steps), *self.unchanged]


class Outcome(BaseModel, frozen=True):
    address: str
    before: str | None
    after: str | None
    status: Literal["changed", "unchanged", "restored", "not restored", "stuck"]


class Result(BaseModel, frozen=True):
    action: Literal["bind", "unbind"]
    ok: bool
    outcomes: list[Outcome]
    error: str | None = None


class WriteTimeout(Exception):
    pass


def plan_bind(host: HostRoot, addresses: list[str], *, nvml: ModuleType | None = None,
              topology: PciTopology | None = None) -> Plan:
    """The writes that put `addresses` and the rest of their IOMMU groups on vfio-pci, or `BindRefused`."""
    topology = topology or PciTopology(host)
    reasons = []
    if not topology.groups:
        reasons.append("the IOMMU is off (/sys/kernel/iommu_groups is empty); see `hearth vfio check` for the fix")
    if not host.path(DRIVERS, VFIO_DRIVER).is_dir():
        reasons.append("the vfio-pci driver is not loaded; run `modprobe vfio-pci` (and list it in "
                       "/etc/modules-load.d/vfio.conf)")
    members, group_reasons = _expand(topology, addresses)
    reasons += group_reasons
    if reasons:
        raise BindRefused(_refusal("bind", reasons))
    reasons, notes = _in_use(host, [m for m in members if m.driver == "nvidia"], nvml)
    if reasons:
        raise BindRefused(_refusal("bind", reasons))
    steps, unchanged = [], []
    for device in members:
        if device.driver == VFIO_DRIVER:
            unchanged.append(device)
            continue
        base = host.path(DEVICES, device.address)
        writes = [Write(path=str(base / "driver_override"), value=VFIO_DRIVER)]
        if device.driver:
            writes.append(Write(path=str(host.path(DRIVERS, device.driver, "unbind")), value=device.address))
        writes.append(Write(path=str(host.path("sys/bus/pci/drivers_probe")), value=device.address))
        steps.append(Step(device=device, target=VFIO_DRIVER, writes=writes))
    return Plan(action="bind", steps=steps, unchanged=unchanged, notes=notes)


def plan_unbind(host: HostRoot, addresses: list[str], driver: str | None = None, *,
                topology: PciTopology | None = None) -> Plan:
    """The writes that give `addresses` (and their cards' other functions) back to host drivers.

    With `driver`, the named devices are bound to it explicitly; everything else goes to whatever driver
    the kernel probes for it. Refused while a VMM holds the group's /dev/vfio file.
    """
    topology = topology or PciTopology(host)
    reasons = []
    if driver is not None and not host.path(DRIVERS, driver).is_dir():
        reasons.append(f"the {driver} driver is not loaded; run `modprobe {driver}` first")
    members, expand_reasons = _expand(topology, addresses, foreign_ok=True)
    reasons += expand_reasons
    groups = {m.iommu_group for m in members if m.driver == VFIO_DRIVER and m.iommu_group is not None}
    vfio_files = {f"/dev/vfio/{g}" for g in groups} | {
        f"/dev/vfio/devices/{m.vfio_cdev}" for m in members if m.vfio_cdev}
    reasons += [f"{h}: a VM is using the group; stop it first" for h in holders(host, vfio_files)]
    if reasons:
        raise BindRefused(_refusal("unbind", reasons))
    requested = {parse_address(a) for a in addresses}
    steps, unchanged = [], []
    for device in members:
        if device.driver != VFIO_DRIVER:
            unchanged.append(device)
            continue
        target = driver if driver and device.address in requested else None
        base = host.path(DEVICES, device.address)
        writes = [Write(path=str(base / "driver_override"), value=""),
                  Write(path=str(host.path(DRIVERS, VFIO_DRIVER, "unbind")), value=device.address)]
        if target:
            writes.append(Write(path=str(host.path(DRIVERS, target, "bind")), value=device.address))
        else:
            writes.append(Write(path=str(host.path("sys/bus/pci/drivers_probe")), value=device.address))
        steps.append(Step(device=device, target=target, writes=writes))
    return Plan(action="unbind", steps=steps, unchanged=unchanged)


def apply(host: HostRoot, plan: Plan, timeout: float = TIMEOUT) -> Result:
    """Run the plan's writes; on failure restore what was touched and raise `BindFailed` with the result."""
    done: list[Step] = []
    for step in plan.steps:
        done.append(step)
        try:
            for write in step.writes:
                _write(write, timeout)
                if write.path.endswith("/unbind"):
                    _wait_for(host, step.device.address, lambda d: d is None, timeout, "to leave its driver")
            if step.target:
                _wait_for(host, step.device.address, lambda d: d == step.target, timeout, f"to bind to {step.target}")
            else:
                # drivers_probe: a host driver that claims the device binds during the probe, or just after it
                # with asynchronous probing; a device that no driver claims stays without one.
                with contextlib.suppress(OSError):
                    _wait_for(host, step.device.address, lambda d: d is not None, min(timeout, PROBE_SETTLE_S), "")
                _wait_for(host, step.device.address, lambda d: d != VFIO_DRIVER, timeout, "to bind to a host driver")
        except (OSError, WriteTimeout) as error:
            stuck = step.device.address if isinstance(error, WriteTimeout) else None
            outcomes = _restore(host, done, stuck, timeout)
            outcomes += [Outcome(address=d.address, before=d.driver, after=d.driver, status="unchanged")
                         for d in plan.unchanged]
            result = Result(action=plan.action, ok=False, outcomes=outcomes, error=_describe(error))
            raise BindFailed(_failure_message(plan.action, result), result) from error
    outcomes = [Outcome(address=s.device.address, before=s.device.driver,
                        after=_current_driver(host, s.device.address), status="changed") for s in plan.steps]
    outcomes += [Outcome(address=d.address, before=d.driver, after=d.driver, status="unchanged") for d in plan.unchanged]
    return Result(action=plan.action, ok=True, outcomes=outcomes)


def _expand(topology: PciTopology, addresses: list[str],
            foreign_ok: bool = False) -> tuple[list[PciDevice], list[str]]:
    """The requested devices plus their groups' other non-bridge members, in address order.

    A member is taken along when it shares a slot with a requested device (the card's audio, USB, UCSI
    functions). Any other member is foreign: for bind that refuses the group, naming the device; for
    unbind (`foreign_ok`) it is left where it is.
    """
    requested = [parse_address(a) for a in addresses]
    slots = {topology.devices[a].slot for a in requested if a in topology.devices}
    reasons, chosen = [], {}
    for address in requested:
        device = topology.devices.get(address)
        if device is None:
            reasons.append(f"{address}: no such PCI device on this host (see `hearth vfio status`)")
            continue
        if device.is_bridge:
            reasons.append(f"{address}: is a PCI bridge; bridges stay with the host")
            continue
        group = topology.group_of(device)
        if group is None:
            reasons.append(f"{address}: has no IOMMU group, so it cannot go to a VM")
            continue
        chosen[address] = device
        for member in group.members:
            other = topology.devices.get(member)
            if other is None or other.is_bridge or member in chosen:
                continue
            if other.slot in slots or member in requested:
                chosen[member] = other
            elif not foreign_ok:
                reasons.append(
                    f"{address}: IOMMU group {group.number} also holds {other.describe()}, which you did not "
                    f"ask for; binding the group would take it from the host. Name it too if it should go to "
                    f"VMs, or move the GPU to a slot with its own group")
    return [chosen[a] for a in sorted(chosen)], reasons


def _in_use(host: HostRoot, on_nvidia: list[PciDevice], nvml: ModuleType | None) -> tuple[list[str], list[str]]:
    """Reasons a GPU on nvidia must not be unbound now: NVML processes, persistence mode, open /dev/nvidia<N>."""
    if not on_nvidia:
        return [], []
    report = nvml_inventory(host, nvml)
    notes = [] if report.available else [f"NVML: {report.reason}; checked /proc for users instead"]
    reasons = []
    for device in on_nvidia:
        gpu = report.gpus.get(device.address)
        if gpu and gpu.processes:
            pids = ", ".join(f"pid {p.pid}" for p in gpu.processes)
            reasons.append(f"{device.address}: NVML lists processes on it ({pids}); stop them first")
        if gpu and gpu.persistence_mode:
            reasons.append(f"{device.address}: persistence mode is on; run `nvidia-smi -i {device.address} -pm 0` "
                           "or stop nvidia-persistenced")
        minor = gpu.minor if gpu and gpu.minor is not None else nvidia_minor(host, device.address)
        if minor is not None:
            paths = {f"/dev/nvidia{minor}"}
        else:  # which /dev/nvidiaN is this GPU? Unknown, so any holder counts.
            paths = {f"/dev/nvidia{n}" for n in range(64)}
        for holder in holders(host, paths):
            reasons.append(f"{device.address}: {holder}; stop it first (unbinding now would hang in the driver)")
    return reasons, notes


def _write(write: Write, timeout: float) -> None:
    """One sysfs write, as `echo value > path` does it, abandoned after `timeout` seconds.

    The write runs in a daemon thread: a write stuck in the kernel cannot be cancelled, only left behind.
    The path is never created (sysfs attributes exist or the write is wrong).
    """
    error: list[OSError] = []

    def run() -> None:
        try:
            fd = os.open(write.path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, (write.value + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            error.append(e)

    thread = threading.Thread(target=run, name=f"sysfs write {write.path}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise WriteTimeout(f"`{write}` did not finish in {timeout:g} s")
    if error:
        raise OSError(error[0].errno, f"`{write}` failed: {error[0].strerror}")


def _wait_for(host: HostRoot, address: str, ok, timeout: float, what: str) -> None:
    """Verify the device's driver link. Real sysfs writes are synchronous; this also waits out slow probes."""
    deadline = time.monotonic() + timeout
    while not ok(driver := _current_driver(host, address)):
        if time.monotonic() > deadline:
            raise OSError(f"{address} did not manage {what} within {timeout:g} s (driver now: {driver or 'none'})")
        time.sleep(0.01)


def _current_driver(host: HostRoot, address: str) -> str | None:
    return read_device(host, address).driver


def _restore(host: HostRoot, done: list[Step], stuck: str | None, timeout: float) -> list[Outcome]:
    """Put every touched device back on its original driver and override, newest first."""
    outcomes = []
    for step in reversed(done):
        device = step.device
        if device.address == stuck:
            outcomes.append(Outcome(address=device.address, before=device.driver, after=None, status="stuck"))
            continue  # a further write would hang the same way
        try:
            now = _current_driver(host, device.address)
            _write(Write(path=str(host.path(DEVICES, device.address, "driver_override")),
                         value=device.driver_override or ""), timeout)
            if now != device.driver:
                if now:
                    _write(Write(path=str(host.path(DRIVERS, now, "unbind")), value=device.address), timeout)
                    _wait_for(host, device.address, lambda d: d is None, timeout, "to leave its driver")
                if device.driver:
                    _write(Write(path=str(host.path(DRIVERS, device.driver, "bind")), value=device.address), timeout)
                    _wait_for(host, device.address, lambda d: d == device.driver, timeout, f"to return to {device.driver}")
            status = "restored"
        except (OSError, WriteTimeout):
            status = "not restored"
        outcomes.append(Outcome(address=device.address, before=device.driver,
                                after=_current_driver(host, device.address), status=status))
    return outcomes


def _refusal(action: str, reasons: list[str]) -> str:
    return f"refusing to {action}; nothing was changed:\n" + "\n".join(f"  - {r}" for r in reasons)


def _failure_message(action: str, result: Result) -> str:
    lines = [f"{action} failed: {result.error}"]
    for o in result.outcomes:
        lines.append(f"  {o.address}: {o.status} (was {o.before or 'no driver'}, now {o.after or 'no driver'})")
    if any(o.status == "stuck" for o in result.outcomes):
        lines.append("  a stuck device is still inside a kernel write; it may finish later. Check "
                     "`hearth vfio status`; if it never does, the host needs a reboot")
    return "\n".join(lines)


def _describe(error: BaseException) -> str:
    return re.sub(r"^\[Errno \d+\] ", "", str(error))

