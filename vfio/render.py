"""How the reports read to an admin in a terminal (rich) and to a monitor (JSON)."""

from __future__ import annotations

import json

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from vfio.bars import size_text
from vfio.bind import Plan, Result
from vfio.inventory import GpuReport, HostReport
from vfio.numa import cpulist
from vfio.readiness import Finding

MARK = {"ok": ("✓", "green"), "info": ("·", "dim"), "warning": ("!", "yellow"), "error": ("✗", "red")}


def report_json(report: HostReport) -> str:
    data = report.model_dump(mode="json")
    data["problems"] = [p.model_dump(mode="json") for p in report.problems]
    data["exit_code"] = report.exit_code
    return json.dumps(data, indent=2)


def finding_line(finding: Finding, with_fix: bool = False, subject: bool = True) -> Text:
    mark, style = MARK[finding.severity]
    subject = "" if finding.subject == "host" or not subject else f"{finding.subject}: "
    text = Text.assemble((f" {mark} ", style), subject, finding.message)
    if with_fix and finding.fix:
        text.append(Text.assemble("\n     fix: ", (finding.fix, "bold")))
    return text


def status(report: HostReport) -> Group:
    parts: list = [Text(f"Host readiness (host root {report.host_root})", style="bold")]
    parts += [finding_line(f) for f in report.host]
    if report.nvml.available:
        parts.append(Text(f" · NVML: driver {report.nvml.driver_version}, {len(report.nvml.gpus)} GPUs on nvidia"))
    else:
        parts.append(Text(f" · NVML {report.nvml.reason}", style="dim"))
    for node in report.numa:
        parts.append(Text(f" · NUMA node {node.number}: CPUs {cpulist(node.cpus) or 'none'}; 1 GiB hugepages "
                          f"{node.hugepages_1g_free} free of {node.hugepages_1g}"))
    if report.fabric_manager is not None:
        switches = sum(1 for g in report.gpus if g.kind == "nvswitch")
        parts.append(Text(f" · {switches} NVSwitches; {report.fabric_manager.describe()} (found: "
                          f"{report.fabric_manager.evidence}): VMs get GPUs only, so NVLink between a VM's GPUs needs it "
                          "running with FABRIC_MODE=1 (shared NVSwitch)"))
    if report.address_bits:
        parts.append(Text(f" · {report.address_bits}-bit physical addresses (a VM's guest gets at most 46: its "
                          "GPUs' 64-bit BARs must fit below that)"))
    if report.gpus:
        parts.append(_gpu_table(report.gpus))
    return Group(*parts)


def check(report: HostReport) -> Group:
    problems = report.problems
    if not problems:
        gpus = sum(1 for g in report.gpus if g.kind == "gpu")
        return Group(Text(f"OK: host ready for VFIO, {gpus} GPUs checked", style="green"))
    errors = sum(1 for p in problems if p.severity == "error")
    head = Text(f"{errors} errors, {len(problems) - errors} warnings (host root {report.host_root})", style="bold")
    return Group(head, *(finding_line(p, with_fix=True) for p in problems))


def plan(plan: Plan) -> Group:
    parts: list = []
    for step in plan.steps:
        to = step.target or "its host driver"
        parts.append(Text(f"{step.device.address} {step.device.name}: {step.device.driver or 'no driver'} -> {to}", style="bold"))
        parts += [Text(f"  {w}") for w in step.writes]
    for device in plan.unchanged:
        parts.append(Text(f"{device.address} {device.name}: already on {device.driver or 'no driver'}, nothing to do"))
    parts += [Text(f"note: {n}", style="yellow") for n in plan.notes]
    return Group(*parts)


def result(result: Result) -> Group:
    lines = [
        Text(f" {'✓' if o.status in ('changed', 'unchanged') else '✗'} {o.address}: "
             f"{o.before or 'no driver'} -> {o.after or 'no driver'} ({o.status})")
        for o in result.outcomes
    ]
    return Group(*lines)


def _gpu_table(gpus: list[GpuReport]) -> Table:
    table = Table(title="GPUs and NVSwitches", title_justify="left", expand=False)
    for column in ("address", "name", "driver", "group", "viable", "NUMA", "BARs", "/dev/vfio/N", "problems"):
        table.add_column(column, overflow="fold")
    for gpu in gpus:
        device = gpu.device
        name = Text(gpu.nvml.name if gpu.nvml else device.name)
        if gpu.kind == "nvswitch":
            name.append(" (NVSwitch)", style="dim")
        for member in gpu.group_members:
            if member.address != device.address:
                name.append(f"\n+ {member.address} {member.name} ({member.driver or 'no driver'})", style="dim")
        dev = gpu.dev_vfio
        if dev is not None and dev.present:
            dev_text = f"{dev.path} {dev.owner} {dev.mode}"
        else:
            dev_text = "missing" if device.driver == "vfio-pci" else "-"
        problems = Text()
        for finding in gpu.findings:
            if problems:
                problems.append("\n")
            problems.append_text(finding_line(finding, subject=False))
        if gpu.holders:
            problems.append("\n" + "; ".join(str(h) for h in gpu.holders), style="yellow")
        table.add_row(
            device.address, name, device.driver or "none",
            "-" if device.iommu_group is None else str(device.iommu_group),
            Text("yes", "green") if gpu.group_viable else Text("no", "red"),
            "-" if device.numa_node is None else str(device.numa_node),
            "\n".join(_bar(b) for b in gpu.bars) or "-",
            dev_text, problems,
        )
    return table


def _bar(bar) -> str:
    """`128G 64-bit pref`: a BAR as lspci sizes it, compact enough for a table cell."""
    size = size_text(bar.size).replace(" GiB", "G").replace(" MiB", "M").replace(" KiB", "K").replace(" TiB", "T")
    if bar.is_rom:
        return f"{size} ROM"
    if bar.kind == "io":
        return f"{size} I/O"
    return f"{size} {'64' if bar.is_64bit else '32'}-bit" + (" pref" if bar.prefetchable else "")


def console() -> Console:
    return Console(highlight=False, soft_wrap=False, emoji=False, markup=False)
