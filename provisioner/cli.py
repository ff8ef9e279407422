"""The `hearth` command."""

from __future__ import annotations

import typer

from vfio.cli import app as vfio_app

app = typer.Typer(help="hearth: a notebook cell becomes a GPU cluster of Cloud Hypervisor microVMs joined by Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(vfio_app, name="vfio")


def main() -> None:
    app()
