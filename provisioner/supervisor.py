"""The process that owns a cluster started by `hearth up`, so the cluster outlives the command.

`hearth up` writes the spec into a state directory and starts `python -m provisioner.supervisor DIR` in a
session of its own. The supervisor boots the cluster and keeps it: the Ray head and every node are its
children and die with it (PR_SET_PDEATHSIG). It records what happens in DIR:

    spec.json     the cluster spec               events.jsonl  every node event, as it happens
    state.json    ClusterRun.summary(), rewritten atomically on every event, and `process`: the supervisor's
                  pid and start time (processes.recorded), so that a pid reused after it ended is never
                  taken for it
    token         the cluster's Ray token (mode 0600; never in state.json)

SIGTERM or SIGINT (what `hearth down` sends, through a pidfd on the recorded process) tears the cluster
down and ends the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from provisioner import userdirs
from provisioner.run import ClusterRun, default_work_dir
from provisioner.events import NodeEvent
from provisioner.files import write_atomic
from provisioner.processes import HeldProcess, recorded, runs
from provisioner.spec import ClusterSpec
from provisioner.hosts import load_inventory


def state_root() -> Path:
    """Where every cluster's state directory is: this user's alone, checked on each call (userdirs.py)."""
    return userdirs.state_root()


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None


def alive(state: dict[str, Any] | None) -> bool:
    """Whether the process that wrote `state` still runs. A supervisor's state names it by pid and start time,
    so a pid reused since it ended does not count; a kernel's names its pid only."""
    if not state or not state.get("pid"):
        return False
    if isinstance(state.get("process"), dict):
        held = HeldProcess.recorded(state["process"])
        if held is not None:
            held.close()
        return held is not None
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervisor_of(directory: Path, state: dict[str, Any]) -> HeldProcess | None:
    """The supervisor that wrote `state` in `directory`, held by a pidfd, if it still runs: recognised by the
    start time it recorded, or (a state file from before it recorded one) by its command line."""
    if isinstance(state.get("process"), dict):
        return HeldProcess.recorded(state["process"])
    return HeldProcess.find(state.get("pid"), runs("provisioner.supervisor", str(directory)))


async def supervise(directory: Path) -> int:
    spec = ClusterSpec.model_validate_json((directory / "spec.json").read_text())
    hosts_file = directory / "hosts.yaml"
    inventory = load_inventory(hosts_file) if hosts_file.exists() else None
    events = open(directory / "events.jsonl", "a", buffering=1)
    run: ClusterRun

    me = recorded()

    def save() -> None:
        write_atomic(directory / "state.json", json.dumps({**run.summary(), "process": me}, indent=1))

    def on_event(event: NodeEvent) -> None:
        events.write(event.model_dump_json() + "\n")
        save()

    run = ClusterRun(spec, default_work_dir(spec.name), inventory=inventory, on_event=on_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if run.head is not None:
        write_atomic(directory / "token", run.head.token, mode=0o600)
    save()
    booting = asyncio.create_task(run.up())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({booting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if not booting.done():  # `hearth down` (or Ctrl-C in `hearth up`) while booting: cancel tears it down
        booting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await booting
    elif booting.exception() is not None:
        code = 1
    else:
        save()
        await stop.wait()
        await run.down()
    save()
    with contextlib.suppress(FileNotFoundError):
        (directory / "token").unlink()
    events.close()
    return code


def main() -> None:
    sys.exit(asyncio.run(supervise(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
