"""`hearth vfio ...`: status and check for admins and monitors; bind and unbind, safely."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vfio.errors import BindFailed, HearthError, SpecError
from vfio import render
from vfio.address import parse_address, parse_driver
from vfio.bind import TIMEOUT, apply, plan_bind, plan_unbind
from vfio.hostroot import ENV_VAR, HostRoot
from vfio.inventory import host_report
from vfio.pci import PciTopology
from vfio.persist import RECORD, read_record, write_record

app = typer.Typer(help="GPUs on vfio-pci: the host's IOMMU picture, checks for monitoring, safe bind/unbind.",
                  no_args_is_help=True)

HostRootOption = Annotated[
    Optional[Path],
    typer.Option("--host-root", envvar=ENV_VAR, help="Resolve /sys, /proc, /dev, /etc under this directory.",
                 show_default="/"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command()
def status(host_root: HostRootOption = None, json: JsonOption = False) -> None:
    """Host readiness, then every NVIDIA GPU and NVSwitch with its driver, IOMMU group and problems."""
    report = _run(lambda: host_report(HostRoot(host_root)))
    if json:
        typer.echo(render.report_json(report))
    else:
        render.console().print(render.status(report))


@app.command()
def check(host_root: HostRootOption = None, json: JsonOption = False) -> None:
    """The same checks, each problem with its fix. Exit 0 ready, 1 warnings, 2 errors, 3 could not check."""
    report = _run(lambda: host_report(HostRoot(host_root)), code=3)
    if json:
        typer.echo(render.report_json(report))
    else:
        render.console().print(render.check(report))
    raise typer.Exit(report.exit_code)


@app.command()
def bind(
    addresses: Annotated[Optional[list[str]], typer.Argument(help="PCI addresses (0000:3b:00.0).", show_default=False)] = None,
    all_gpus: Annotated[bool, typer.Option("--all-gpus", help="Every NVIDIA GPU on the host.")] = False,
    persisted: Annotated[bool, typer.Option("--persisted", help=f"What {RECORD} records (run at boot).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact sysfs writes; change nothing.")] = False,
    persist: Annotated[bool, typer.Option("--persist", help=f"Record the binding in {RECORD} for boot.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each sysfs write may take.")] = TIMEOUT,
    host_root: HostRootOption = None,
) -> None:
    """Bind GPUs, with the rest of their IOMMU groups, to vfio-pci: the whole group or nothing."""
    if sum((bool(addresses), all_gpus, persisted)) != 1:
        _fail("name the devices: give ADDRESS..., --all-gpus or --persisted (exactly one of them)")
    host = _run(lambda: HostRoot(host_root))
    topology = _run(lambda: PciTopology(host))
    skipped = []
    if all_gpus:
        addresses = [g.address for g in topology.gpus]
        if not addresses:
            _fail("--all-gpus: there are no NVIDIA GPUs on this host (see `hearth vfio status`)")
    elif persisted:
        record = _run(lambda: read_record(host)) or {}
        addresses = []
        for address, ids in record.items():
            device = topology.devices.get(address)
            if device is None or device.ids != ids:
                found = f"{device.ids} there now" if device else "no device there now"
                skipped.append(f"{address}: recorded as {ids} but {found}; not binding it. Fix {RECORD}")
            else:
                addresses.append(address)
    addresses = _run(lambda: [parse_address(a) for a in addresses])
    plan = _run(lambda: plan_bind(host, addresses, topology=topology))
    _carry_out(host, plan, dry_run, timeout)
    if persist and not dry_run:
        record = _run(lambda: read_record(host)) or {}
        record.update({d.address: d.ids for d in plan.devices})
        write_record(host, record)
        typer.echo(f"recorded {len(plan.devices)} devices in {host.path(RECORD)}")
    for line in skipped:
        typer.echo(f"error: {line}", err=True)
    if skipped:
        raise typer.Exit(1)


@app.command()
def unbind(
    addresses: Annotated[list[str], typer.Argument(help="PCI addresses (0000:3b:00.0).", show_default=False)],
    driver: Annotated[Optional[str], typer.Option(help="Bind the named devices to this driver (e.g. nvidia); "
                                                  "default: whatever driver the kernel probes.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact sysfs writes; change nothing.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each sysfs write may take.")] = TIMEOUT,
    host_root: HostRootOption = None,
) -> None:
    """Give devices (and their cards' other functions) back from vfio-pci to host drivers."""
    host = _run(lambda: HostRoot(host_root))
    addresses = _run(lambda: [parse_address(a) for a in addresses])
    driver = _run(lambda: parse_driver(driver) if driver else None)
    plan = _run(lambda: plan_unbind(host, addresses, driver))
    _carry_out(host, plan, dry_run, timeout)
    record = _run(lambda: read_record(host))
    if record and not dry_run and any(d.address in record for d in plan.devices):
        write_record(host, {a: ids for a, ids in record.items() if a not in {d.address for d in plan.devices}})
        typer.echo(f"removed them from {host.path(RECORD)}: they stay off vfio-pci at boot")


def _carry_out(host: HostRoot, plan, dry_run: bool, timeout: float) -> None:
    console = render.console()
    console.print(render.plan(plan))
    if dry_run:
        typer.echo("dry run: nothing was written")
    if dry_run or not plan.steps:
        return
    try:
        result = apply(host, plan, timeout)
    except BindFailed as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    console.print(render.result(result))


def _run(action, code: int | None = None):
    """Run `action`; a HearthError becomes its message on stderr and exit `code`
    (by default 2 for bad input, 1 for the rest)."""
    try:
        return action()
    except HearthError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code or (2 if isinstance(error, SpecError) else 1)) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
