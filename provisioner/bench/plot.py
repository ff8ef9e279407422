"""`hearth bench boot --plot boot.png`: each run's boot as a timeline, one row per node (a Gantt chart), the
phases coloured as in the notebook's view (timeline.py, the same rows), on a time axis the nodes share.

matplotlib is an optional extra (`pip install 'hearth[plot]'`), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.profile import phase_names
from provisioner.timeline import COLOURS, rows

EXTRA = "plot"


def require_matplotlib():
    """matplotlib's pyplot on a file-only backend, or an error that names the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"--plot needs matplotlib: pip install 'hearth[{EXTRA}]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TITLES = {"parallel": "one host", "hosts": "many hosts"}


def draw(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per run (`parallel`, `hosts`), rows of phase bars; written to `path`."""
    plt = require_matplotlib()
    from matplotlib.patches import Patch

    runs = [(key, summary) for key, summary in summaries.items() if summary.get("nodes")]
    heights = [max(2.0, min(0.09 * (len(s["nodes"]) + 1), 14.0)) for _, s in runs]
    figure, axes = plt.subplots(len(runs), 1, figsize=(11, sum(heights) + 1.2 * len(runs)), squeeze=False,
                                gridspec_kw={"height_ratios": heights})
    for (key, summary), ax in zip(runs, axes[:, 0]):
        _, span, found = rows(summary, now=summary.get("ready_at"))
        for y, row in enumerate(found):
            for bar in row.bars:
                ax.barh(y, bar.end - bar.start, left=bar.start, height=0.8, color=COLOURS[bar.phase], linewidth=0)
            if row.failed_at is not None:
                ax.plot([row.failed_at] * 2, [y - 0.45, y + 0.45], color=COLOURS["failed"], linewidth=1.5)
        ax.set_ylim(len(found) - 0.5, -0.5)
        ax.set_xlim(0, span * 1.01)
        if len(found) <= 40:
            ax.set_yticks(range(len(found)), [r.name for r in found], fontsize=7)
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{len(found)} nodes, one row each", fontsize=8)
        ax.set_xlabel("seconds since the cluster was asked for")
        ax.set_title(f"{summary['name']} ({TITLES.get(key, key)}): {len(summary['nodes'])} nodes, ready after "
                     f"{(summary['ready_at'] or 0) - summary['created_at']:.2f} s", fontsize=10, loc="left")
        ax.grid(axis="x", linewidth=0.3)
    names = phase_names(runs[0][1].get("backend", "")) if runs else {}
    legend = [Patch(color=COLOURS[state], label=name) for state, name in names.items() if state in COLOURS]
    legend.append(Patch(color=COLOURS["failed"], label="failed"))
    figure.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
