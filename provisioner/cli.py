"""The `hearth` command: clusters (up, status, down, demo), jobs, benchmarks, and `hearth vfio`."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from provisioner import userdirs
from provisioner.errors import HearthError, SpecError, UnsafeDirectory
from provisioner.progress import ProgressLine, profile_table
from provisioner.spec import cluster_spec, default_backend
from provisioner.hosts import load_inventory
from provisioner.supervisor import alive, read_state, state_root, supervisor_of
from vfio.cli import app as vfio_app

app = typer.Typer(help="hearth: a notebook cell becomes a GPU cluster of Cloud Hypervisor microVMs joined by Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
job_app = typer.Typer(help="Ray jobs on a hearth cluster.", no_args_is_help=True)
hosts_app = typer.Typer(help="The GPU hosts in a hosts file, through their agents.", no_args_is_help=True)
guest_app = typer.Typer(help="The guest image every node boots.", no_args_is_help=True)
env_app = typer.Typer(help="The environment image: this Python environment, packed for the nodes.", no_args_is_help=True)
app.add_typer(vfio_app, name="vfio")
app.add_typer(job_app, name="job")
app.add_typer(hosts_app, name="hosts")
app.add_typer(guest_app, name="guest")
app.add_typer(env_app, name="env")
console = Console(highlight=False)
NameOption = Annotated[str, typer.Option("--name", help="Which cluster (hearth up --name).")]
DEFAULT_NAME = "hearth"


def main() -> None:
    from provisioner.bench import app as bench_app  # imported late: it pulls in Ray's test utilities

    app.add_typer(bench_app, name="bench")
    try:
        app()
    except UnsafeDirectory as error:  # any command that reads or writes the run or state directories
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


@app.command()
def up(
    nodes: Annotated[int, typer.Option(help="How many nodes.")] = 2,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node (local backend: Ray sees fake ones).")] = 0,
    backend: Annotated[Optional[str], typer.Option(help="local, cloud-hypervisor or qemu (default: local, "
                                                   "or cloud-hypervisor with --hosts).")] = None,
    hosts: Annotated[Optional[Path], typer.Option(help="Hosts inventory (YAML).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Guest image directory (VM backends).")] = None,
    cpus: Annotated[int, typer.Option(help="CPUs per node.")] = 1,
    memory_gib: Annotated[int, typer.Option(help="Memory per node, GiB.")] = 4,
    boot_timeout: Annotated[float, typer.Option(help="Seconds a node may take to be ready.")] = 300.0,
    min_nodes: Annotated[Optional[int], typer.Option(help="Ready with this many (default: all).")] = None,
    pack_env: Annotated[bool, typer.Option(help="VMs run Ray from this controller's packed environment "
                                           "(--no-pack-env: the guest image's own).")] = True,
    name: NameOption = DEFAULT_NAME,
) -> None:
    """Boot a cluster and leave it running until `hearth down`. Returns once it is ready or has failed."""
    spec = _run(lambda: cluster_spec(nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                                     backend=default_backend(backend, hosts),
                                     cpus=cpus, memory_gib=memory_gib, boot_timeout=boot_timeout,
                                     min_nodes=min_nodes, name=name, pack_env=pack_env))
    from provisioner.run import default_work_dir

    inventory_text = None
    if hosts is not None:  # checked before any directory is made
        _run(lambda: load_inventory(hosts))
        inventory_text = hosts.read_text()
    default_work_dir(name)  # the supervisor's run directory: refused here, with the fix, if another user could touch it
    directory = state_root() / name
    if alive(read_state(directory)):
        _fail(f"cluster {name} is already up; `hearth down --name {name}` first, or pick another --name", 1)
    for stale in ("state.json", "events.jsonl", "token", "hosts.yaml"):
        (directory / stale).unlink(missing_ok=True)
    userdirs.ensure(directory, "state directory")
    (directory / "spec.json").write_text(spec.model_dump_json())
    if inventory_text is not None:
        (directory / "hosts.yaml").write_text(inventory_text)
    with open(directory / "supervisor.log", "ab") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "provisioner.supervisor", str(directory)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    state = _follow(directory, supervisor, spec.nodes)
    if state is None or state.get("status") != "ready":
        if supervisor.poll() is not None and supervisor.returncode < 0:  # killed: it could not tear down
            _fail(f"cluster {name} did not come up: its supervisor was killed (signal {-supervisor.returncode}); "
                  "its Ray head went with it, and its VMs power themselves off when they notice", 1)
        error = (state or {}).get("error") or f"the supervisor exited; see {directory / 'supervisor.log'}"
        _fail(f"cluster {name} did not come up, and nothing is left running:\n{error}", 1)
    console.print(profile_table(state["nodes"], state["backend"]))
    for line in gpu_lines(state["nodes"]):
        console.print(line, markup=False, highlight=False)
    ready = [n for n in state["nodes"] if n["state"] == "ready"]
    for node in state["nodes"]:
        if node["state"] != "ready":  # with --min-nodes, the cluster is up without it: say why
            console.print(f"{node['id']}: {'; then '.join(node['errors']) or node['state']}", markup=False)
    console.print(f"cluster {name} is up: {len(ready)} nodes" + (f" of {len(state['nodes'])}" if len(ready) < len(
        state["nodes"]) else "") + f", Ray at {state['ray']['address']}, dashboard {state['ray']['dashboard']}")
    console.print(f"run `hearth job submit --name {name} -- CMD`; stop it with `hearth down --name {name}`")


def gpu_lines(nodes: list[dict]) -> list[str]:
    """Per GPU node: the GPUs its guest found, and each warning its VM's layout carries (4 KiB pages instead of
    hugepages, NVSwitches without Fabric Manager, ...), so that none goes unseen."""
    lines = []
    for node in nodes:
        for event in node.get("events", []):
            detail = event.get("detail") or ""
            if event["state"] == "booting":
                lines += [f"{node['id']}: warning: {w}" for w in detail.split("; warning: ")[1:]]
            elif event["state"] == "guest_up" and "; GPUs: " in detail:
                lines.append(f"{node['id']}: {detail.split('; ', 1)[1]}")
    return lines


def _follow(directory: Path, supervisor: subprocess.Popen, total: int) -> dict | None:
    """Show the boot as it happens from the supervisor's event log; Ctrl-C cancels it (and tears down)."""
    from provisioner.events import NodeEvent

    offset = 0
    try:
        with ProgressLine(total) as progress:
            while True:
                events = directory / "events.jsonl"
                if events.exists():
                    with open(events) as f:
                        f.seek(offset)
                        for line in f:
                            if line.endswith("\n"):
                                progress.update(NodeEvent.model_validate_json(line))
                                offset += len(line.encode())
                state = read_state(directory)
                if state and state.get("status") in ("ready", "failed"):
                    return state
                if supervisor.poll() is not None:
                    return read_state(directory)
                time.sleep(0.1)
    except KeyboardInterrupt:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait()
        console.print("cancelled: everything that was started has been torn down")
        raise typer.Exit(130) from None


@app.command()
def down(name: NameOption = DEFAULT_NAME, timeout: Annotated[float, typer.Option()] = 120.0) -> None:
    """Tear a cluster down: every node, the Ray head, and their files."""
    state = read_state(state_root() / name)
    if not alive(state):
        console.print(f"cluster {name} is not running")
        return
    if state.get("owner") == "kernel":  # its pid is the kernel's: SIGTERM would end the user's kernel
        _fail(f"cluster {name} belongs to a notebook kernel (pid {state['pid']}): close it there with "
              "cluster.close(); `hearth down` stops the clusters `hearth up` started", 1)
    supervisor = supervisor_of(state_root() / name, state)
    if supervisor is None:  # it ended meanwhile, or its pid now belongs to another process: signal nothing
        console.print(f"cluster {name} is not running (its supervisor, pid {state['pid']}, has ended)")
        return
    with supervisor:
        supervisor.signal(signal.SIGTERM)
        if not supervisor.wait(timeout):
            _fail(f"cluster {name}'s supervisor (pid {state['pid']}) did not stop within {timeout:g} s", 1)
    console.print(f"cluster {name} is down")


@app.command()
def status(name: NameOption = DEFAULT_NAME, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A cluster's state: its nodes, their states and boot profiles, and where Ray is."""
    state = read_state(state_root() / name)
    if state is None:
        _fail(f"no cluster {name}; start one with `hearth up --name {name}`", 1)
    if state["status"] == "ready" and not alive(state):
        state["status"] = "gone (its supervisor is not running)"
    if json_output:
        typer.echo(json.dumps(state, indent=2))
        return
    console.print(f"cluster {state['name']} ({state['backend']}): {state['status']}"
                  + (f", Ray {state['ray']['address']}, dashboard {state['ray']['dashboard']}" if state.get("ray") else ""))
    if state.get("env"):
        from provisioner.view import env_text

        env = state["env"]
        console.print(f"environment image {env['sha256'][:12]}, {env['size'] / (1 << 20):.0f} MiB: {env_text(env)}")
    table = Table()
    for column in ("node", "host", "state", "detail", "Ray node", "boot s"):
        table.add_column(column)
    for node in state["nodes"]:
        table.add_row(node["id"], node["host"], node["state"], (node["detail"] or "")[:60],
                      (node["ray_node_id"] or "-")[:12], f"{node['profile'].get('total', 0):.2f}")
    console.print(table)


@app.command()
def demo(nodes: Annotated[int, typer.Option(help="How many local nodes.")] = 2) -> None:
    """The main job on the embedded default: boot a local cluster, run a Ray job on it, print each node's
    boot profile, tear it down."""
    from provisioner.run import ClusterRun, default_work_dir
    from provisioner.jobs import follow

    spec = cluster_spec(nodes=nodes, name=f"demo-{os.getpid()}")
    script = ("import ray; ray.init(); "
              "f = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_labels()['hearth.io/node']); "
              f"print('the job ran on', sorted(ray.get([f.options(label_selector={{'hearth.io/node': n}}).remote() "
              f"for n in {spec.node_ids()!r}])))")

    async def main() -> None:
        with ProgressLine(spec.nodes) as progress:
            run = ClusterRun(spec, default_work_dir(spec.name), on_event=progress.update)
            await run.up()
        try:
            console.print(f"cluster ready; dashboard {run.head.dashboard_url}; submitting a Ray job")
            client = run.job_client()
            job = run.submit_job(f"python -c {shlex.quote(script)}")
            result = await asyncio.to_thread(follow, client, job)
            console.print(f"job {job}: {result.value}")
            console.print(profile_table(run.summary()["nodes"], spec.backend))
        finally:
            await run.down()
            console.print("torn down")

    try:
        asyncio.run(main())
    except HearthError as error:
        _fail(str(error), 1)


@app.command()
def connect(name: NameOption = DEFAULT_NAME) -> None:
    """Print the shell exports that point Ray's own tools at a cluster: `eval "$(hearth connect --name NAME)"`,
    then `ray status`, `ray job submit ...`, `ray.init()` in another process. The token stays in its file
    (mode 0600, yours): only its path is printed, so it reaches no command line and no shell history."""
    directory = state_root() / name
    state = read_state(directory)
    if not alive(state) or state.get("status") != "ready" or not state.get("ray"):
        _fail(f"cluster {name} is not up; start it with `hearth up --name {name}` or Cluster(name={name!r})", 1)
    token = directory / "token"
    if not token.is_file():
        _fail(f"cluster {name} has no token file at {token}: it is not this user's cluster", 1)
    ray = state["ray"]
    for variable, value in (("RAY_ADDRESS", ray["address"]), ("RAY_API_SERVER_ADDRESS", ray["dashboard"]),
                            ("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN_PATH", str(token))):
        typer.echo(f"export {variable}={shlex.quote(value)}")
    typer.echo(f"# cluster {name}: Ray dashboard {ray['dashboard']} (it asks for the token in $RAY_AUTH_TOKEN_PATH; "
               "in JupyterLab, hearth's link opens it without)")


@job_app.command("submit")
def job_submit(command: Annotated[list[str], typer.Argument(help="The entrypoint, after --.")],
               name: NameOption = DEFAULT_NAME,
               no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return.")] = False,
               working_dir: Annotated[Optional[Path], typer.Option(help="Upload this directory for the job.")] = None,
               ) -> None:
    """Submit a job, stream its logs until it ends (as `ray job submit` does); exit 0 only if it succeeded."""
    from provisioner.jobs import follow

    client = _client(name)
    runtime_env = {"working_dir": str(working_dir)} if working_dir else None
    job = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env)
    console.print(f"submitted job {job}", style="dim")
    if no_wait:
        typer.echo(job)
        return
    result = follow(client, job)
    console.print(f"job {job}: {result.value}", style="green" if result.value == "SUCCEEDED" else "red")
    raise typer.Exit(0 if result.value == "SUCCEEDED" else 1)


@job_app.command("status")
def job_status(job_id: str, name: NameOption = DEFAULT_NAME) -> None:
    """A job's status."""
    typer.echo(_client(name).get_job_status(job_id).value)


@job_app.command("logs")
def job_logs(job_id: str, name: NameOption = DEFAULT_NAME,
             follow_logs: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """A job's logs (with --follow, until it ends)."""
    from provisioner.jobs import follow

    client = _client(name)
    if follow_logs:
        follow(client, job_id)
    else:
        typer.echo(client.get_job_logs(job_id), nl=False)


@app.command()
def agent(
    socket: Annotated[Path, typer.Option(help="The Unix socket it serves (mode 0660).")] = Path("/run/hearth/agent.sock"),
    state_dir: Annotated[Path, typer.Option(help="Leases, kept across restarts.")] = Path("/var/lib/hearth/agent"),
    run_dir: Annotated[Path, typer.Option(help="Per-VM sockets and logs.")] = Path("/run/hearth/vms"),
    host_root: Annotated[Optional[Path], typer.Option(help="Root of /sys, /dev, /proc (default / or "
                                                      "$HEARTH_HOST_ROOT).")] = None,
    cloud_hypervisor: Annotated[str, typer.Option(help="The VMM binary.")] = "cloud-hypervisor",
    bridge: Annotated[Optional[str], typer.Option(help="The guests' bridge (a tap per VM goes on it).")] = None,
    subnet: Annotated[Optional[str], typer.Option(help="This host's guest subnet, e.g. 10.77.1.0/24.")] = None,
    group: Annotated[str, typer.Option(help="Group that may use the socket (admins, controllers' SSH user).")] = "hearth",
    hugepages: Annotated[str, typer.Option(help="GPU VMs' memory from 1 GiB hugepages: auto (when free on the GPUs' "
                                           "NUMA node, else 4 KiB pages with a warning), require, off.")] = "auto",
) -> None:
    """The host agent: serves this host's GPUs and VMs to controllers, on a Unix socket only (systemd runs it)."""
    from provisioner.agent.envstore import DEFAULT_MARGIN
    from provisioner.agent.host import AgentConfig
    from provisioner.agent.server import serve
    from provisioner.errors import validated

    root = host_root or Path(os.environ.get("HEARTH_HOST_ROOT", "/"))
    standin = None
    if os.environ.get("HEARTH_STANDIN"):  # the stand-in VMM's settings, for every VM (see ch/standin.py)
        try:
            standin = json.loads(os.environ["HEARTH_STANDIN"])
        except ValueError as error:
            _fail(f"HEARTH_STANDIN is not JSON ({error}): give it an object, e.g. '{{\"guest\": \"agent\"}}'", 2)
    config = _run(lambda: validated(AgentConfig, {
        "host_root": root, "state_dir": state_dir, "run_dir": run_dir, "cloud_hypervisor": cloud_hypervisor,
        "bridge": bridge, "subnet": subnet, "standin": standin, "hugepages": hugepages,
        "env_margin": os.environ.get("HEARTH_AGENT_ENV_MARGIN") or DEFAULT_MARGIN}, "agent options"))
    _run(lambda: asyncio.run(serve(config, socket, group)))


@hosts_app.command("check")
def hosts_check(
    hosts: Annotated[Path, typer.Option(help="Hosts inventory (YAML).")],
    json_output: Annotated[bool, typer.Option("--json")] = False,
    image: Annotated[Optional[Path], typer.Option(help="The guest image the nodes boot (built with --nvidia-driver): "
                                                  "warn of GPUs its driver does not support.")] = None,
) -> None:
    """Reach every host's agent; one table of agent version, GPUs free, cloud-hypervisor, VFIO and network.
    Exits 1 when any host is unreachable or has a problem (warnings, such as GPUs the image's driver does not
    list, do not change it)."""
    import tempfile

    from provisioner.agent.check import gather, table

    inventory = _run(lambda: load_inventory(hosts))
    with tempfile.TemporaryDirectory(prefix="hearth-check-", dir="/tmp") as local:
        rows = _run(lambda: asyncio.run(gather(inventory, Path(local), image)))
    if json_output:
        typer.echo(json.dumps(rows, indent=1))
    else:
        console.print(table(rows))
    if any(r["problems"] for r in rows):
        raise typer.Exit(1)


@guest_app.command("build")
def guest_build(
    out: Annotated[Path, typer.Option(help="Where the image goes (vmlinuz, initrd.img, rootfs.img, manifest.json).")]
    = Path("/var/lib/hearth/image"),
    nvidia_driver: Annotated[Optional[str], typer.Option(
        help="Add NVIDIA's driver from Debian: 535 (bookworm) or 550 (trixie); the modules built for the image's kernel.")]
    = None,
    nvidia_modules: Annotated[Optional[str], typer.Option(
        help="With --nvidia-driver: 'open' kernel modules (Turing and newer; the default) or 'proprietary' "
             "(Maxwell, Pascal, Volta).")] = None,
) -> None:
    """Build the guest image from Debian packages and PyPI (root); a rebuild with the same inputs reuses it."""
    from importlib.metadata import version

    from guest.build import build

    with console.status("guest image ...") as status:
        def say(text: str) -> None:
            console.print(text)
            status.update(text)

        manifest = _run(lambda: build(out, ray_version=version("ray"), nvidia_driver=nvidia_driver,
                                      nvidia_modules=nvidia_modules, say=say))
    console.print_json(json.dumps(manifest))


@env_app.command("pack")
def env_pack(
    image: Annotated[Optional[Path], typer.Option(help="The nodes' guest image directory: its manifest names the "
                                                  "Python and Debian suite they run (default: what `hearth guest "
                                                  "build` makes).")] = None,
    max_size: Annotated[float, typer.Option(help="Refuse an environment bigger than this, GiB.")] = 8.0,
    no_interpreter: Annotated[bool, typer.Option("--no-interpreter", help="Leave this Python's interpreter out: "
                                                 "nodes run the guest image's.")] = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Pack this Python environment into the env image nodes mount (or find it already packed)."""
    from provisioner.envimage import pack

    with console.status("environment image ...") as status:
        packed = _run(lambda: pack(image=image, max_bytes=int(max_size * (1 << 30)), say=status.update,
                                   with_interpreter=not no_interpreter))
    found, env = packed.image, packed.environment
    row = {"key": found.key, "path": str(found.path), "sha256": found.sha256, "size": found.size,
           "cached": packed.cached, "seconds": round(packed.seconds, 3), "python": found.meta["python"],
           "interpreter": found.meta["interpreter"], "interpreter_reason": env.interpreter.reason}
    if json_output:
        typer.echo(json.dumps(row, indent=1))
        return
    how = f"already packed ({packed.seconds:.2f} s to find)" if packed.cached else f"packed in {packed.seconds:.1f} s"
    console.print(f"env image {found.key[:12]}: {found.size / (1 << 20):.0f} MiB, {how}\n  {found.path}\n"
                  f"  Python {row['python']}, interpreter: {row['interpreter']} ({env.interpreter.reason})")


@env_app.command("ls")
def env_ls(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The env images packed on this machine; the current environment's is marked."""
    from provisioner.envimage import images

    current = _current_env_key()
    rows = [{"key": i.key, "sha256": i.sha256, "size": i.size, "python": i.meta.get("python"),
             "interpreter": i.meta.get("interpreter"), "packed_at": i.meta.get("packed_at"), "path": str(i.path),
             "current": i.key == current} for i in images()]
    if json_output:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table()
    for column in ("key", "size", "Python", "interpreter", "packed", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(row["key"][:12], f"{row['size'] / (1 << 20):.0f} MiB", row["python"], row["interpreter"],
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(row["packed_at"] or 0)),
                      "current" if row["current"] else "")
    console.print(table)


@env_app.command("prune")
def env_prune(
    hosts: Annotated[Optional[Path], typer.Option(help="Also ask these hosts' agents to remove the env images "
                                                  "no VM uses.")] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Remove the env images other than the current environment's: here, and with --hosts on every host."""
    import tempfile

    from provisioner.envimage import images, prune, prune_hosts

    current = _current_env_key()
    keep = {i.sha256 for i in images() if i.key == current}
    report = {"local": prune(keep={current} if current else set()), "hosts": []}
    if hosts is not None:
        inventory = _run(lambda: load_inventory(hosts))
        with tempfile.TemporaryDirectory(prefix="hearth-prune-", dir="/tmp") as local:
            report["hosts"] = _run(lambda: asyncio.run(prune_hosts(inventory, Path(local), keep)))
    if json_output:
        typer.echo(json.dumps(report, indent=1))
    else:
        console.print(f"removed {len(report['local'])} env image(s) here")
        for row in report["hosts"]:
            console.print(f"{row['host']}: " + (f"[red]{row['problem']}[/]" if row["problem"] else
                          f"removed {len(row['removed'])}, kept {len(row['kept'])} (used by a VM, or arriving)"))
    if any(r["problem"] for r in report["hosts"]):
        raise typer.Exit(1)


def _current_env_key() -> str | None:
    """The key of this Python environment's image (packed or not), or None when it cannot be packed."""
    from provisioner.envimage import environment

    try:
        return environment().key
    except HearthError:
        return None


def _client(name: str):
    from provisioner.jobs import job_client

    directory = state_root() / name
    state = read_state(directory)
    if not alive(state) or state.get("status") != "ready":
        _fail(f"cluster {name} is not up; start it with `hearth up --name {name}`", 1)
    return job_client(state["ray"]["dashboard"], (directory / "token").read_text().strip())


def _run(action):
    try:
        return action()
    except HearthError as error:
        _fail(str(error), 2 if isinstance(error, SpecError) else 1)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


if __name__ == "__main__":
    main()
