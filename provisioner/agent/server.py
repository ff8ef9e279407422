"""`hearth agent`: the host agent's HTTP API, on a Unix socket only.

The socket is mode 0660, owned by root and `--group` (default `hearth`, when that group exists): admins
and the controllers' SSH user are in it; nobody else can reach the agent, and there is no TCP listener.
A remote controller reaches the socket through SSH (see client.py). Who calls, and what each caller may do,
is auth.py's: every request carries its caller, from the socket's peer credentials and the controller's
secret. SIGTERM or SIGINT ends the agent and leaves its VMs running, for the next agent to adopt.

Every input is checked before it is used: ids and names against strict patterns before any path is built,
numbers finite and bounded (LIMITS), query parameters known to their endpoint, bodies at most MAX_BODY bytes
(an env image upload streams instead, bounded by its declared size). A refusal is JSON, {"error": "..."},
naming the problem and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from provisioner.agent.auth import Caller, check_controller, identify, peer_uid
from provisioner.agent.envstore import MAX_SIZE, SIZE_HEADER
from provisioner.agent.host import AgentConfig, CreateVm, HostAgent, preflight
from provisioner.agent.ledger import MAX_TTL_S, MIN_TTL_S
from provisioner.errors import AgentError, HearthError, SpecError, VmmError, validated
from provisioner.events import NodeState
from provisioner.node import NODE_ID, NODE_UID

MAX_BODY = 1 << 20  # a VM request is a few KiB; env images stream (PUT /v1/envs) and are bounded by their size
MAX_WAIT_S = 60.0  # a long poll; the controller asks again
MAX_GRACE_S = 120.0  # a stop's polite part; after it, SIGTERM and SIGKILL
MAX_EVENTS = 10_000  # `after`: far more events than a VM's life has
IMAGE = re.compile(r"/[^\0]{0,4095}")
# Each query parameter an endpoint takes: (lowest, highest, default); None for the ones that are not numbers
LIMITS: dict[str, tuple[float, float, float]] = {
    "wait": (0, MAX_WAIT_S, 0), "after": (0, MAX_EVENTS, 0), "grace": (0, MAX_GRACE_S, 5),
    "ttl": (MIN_TTL_S, MAX_TTL_S, 30), "offset": (0, MAX_SIZE, 0), "size": (0, MAX_SIZE, 0),
}
INTEGERS = {"after", "offset", "size"}


def app(agent: HostAgent) -> web.Application:
    envs = agent.envs
    routes = web.RouteTableDef()

    def caller(request: web.Request) -> Caller:
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        return identify(peer_uid(sock), request.headers, agent.ledger.controllers, agent.ledger.retired)

    @routes.get("/v1/info")
    async def info(request: web.Request) -> web.Response:
        _known(request, "image")
        image = request.query.get("image")
        if image is not None and (not IMAGE.fullmatch(image) or "/../" in f"{image}/"):
            raise AgentError(f"image {image[:80]!r} is not an absolute path without '..': name the guest image "
                             "directory as the hosts have it")
        return _json(await asyncio.to_thread(agent.info, Path(image) if image else None))

    @routes.get("/v1/gpus")
    async def gpus(request: web.Request) -> web.Response:
        _known(request)
        return _json(await asyncio.to_thread(agent.gpus))

    @routes.get("/v1/vms")
    async def vms(request: web.Request) -> web.Response:
        _known(request)
        return _json(agent.list_vms(caller(request)))

    @routes.put("/v1/vms/{id}")
    async def create(request: web.Request) -> web.Response:
        _known(request)
        vm_id = _vm_id(request)
        try:
            data = await request.json()
        except ValueError:
            raise AgentError("the request body is not JSON: send the VM request as a JSON object") from None
        return _json(await agent.create_vm(vm_id, validated(CreateVm, data, "VM request"), caller(request)), status=201)

    @routes.get("/v1/vms/{id}")
    async def get(request: web.Request) -> web.Response:
        _known(request, "after", "wait", "uid", "until")
        vm_id, uid = _vm_id(request), request.query.get("uid")
        if uid is not None and not NODE_UID.fullmatch(uid):
            raise AgentError(f"uid {uid[:80]!r} is not a boot attempt's uid: 1 to 64 letters, digits, '_', '-'")
        return _json(await agent.watch(vm_id, int(_number(request, "after")), _number(request, "wait"), uid,
                                       caller(request), _state(request.query.get("until"))))

    @routes.get("/v1/vms/{id}/logs")
    async def logs(request: web.Request) -> web.Response:
        _known(request)
        return _json(agent.logs(_vm_id(request), caller(request)))

    @routes.delete("/v1/vms/{id}")
    async def delete(request: web.Request) -> web.Response:
        _known(request, "grace")
        return _json(await agent.delete_vm(_vm_id(request), _number(request, "grace"), caller(request)))

    @routes.post("/v1/leases/{controller}")
    async def renew(request: web.Request) -> web.Response:
        _known(request, "ttl")
        controller = check_controller(request.match_info["controller"])
        return _json(await agent.lease(controller, _number(request, "ttl"), caller(request)))

    @routes.delete("/v1/leases/{controller}")
    async def release(request: web.Request) -> web.Response:
        _known(request)
        controller = check_controller(request.match_info["controller"])
        await agent.release(controller, caller=caller(request))
        return _json({"released": controller})

    @routes.get("/v1/envs")
    async def env_images(request: web.Request) -> web.Response:
        _known(request)
        return _json(envs.list())

    @routes.get("/v1/envs/{sha256}")
    async def env_image(request: web.Request) -> web.Response:
        _known(request, "size")
        return _json(envs.get(request.match_info["sha256"], int(_number(request, "size")) or None))

    @routes.put("/v1/envs/{sha256}")
    async def env_upload(request: web.Request) -> web.Response:
        _known(request, "offset")
        size = request.headers.get(SIZE_HEADER, "")
        if not size.isdigit() or len(size) > 15:
            raise AgentError(f"an env image upload needs the image's whole size in the {SIZE_HEADER} header")
        return _json(await envs.receive(request.match_info["sha256"], int(_number(request, "offset")), int(size),
                                        request.content.iter_chunked(1 << 20), request.content_length))

    @routes.delete("/v1/envs/{sha256}")
    async def env_delete(request: web.Request) -> web.Response:
        _known(request)
        return _json(envs.delete(request.match_info["sha256"], agent.envs_in_use()))

    application = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    application.add_routes(routes)
    return application


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as error:
        return _json({"error": str(error)}, status=error.status)
    except SpecError as error:
        return _json({"error": str(error)}, status=400)
    except web.HTTPRequestEntityTooLarge:
        return _json({"error": f"the request body is over {MAX_BODY} bytes: a VM request is a few KiB (env images "
                               "go to PUT /v1/envs/{sha256}, streamed)"}, status=413)
    except web.HTTPException as error:  # no such route or method: say so in JSON, as every refusal is
        if error.status < 400:
            raise
        return _json({"error": f"{request.method} {request.path[:200]}: {error.reason} (the API is listed in "
                               "provisioner/agent/__init__.py)"}, status=error.status)
    except (VmmError, HearthError, OSError) as error:
        return _json({"error": str(error)}, status=502)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _vm_id(request: web.Request) -> str:
    """Checked before it becomes part of any path: a VM id is a node id."""
    vm_id = request.match_info["id"]
    if not NODE_ID.fullmatch(vm_id):
        raise AgentError(f"{vm_id[:80]!r} is not a VM id: up to 63 lower-case letters, digits and '-'")
    return vm_id


def _state(value: str | None) -> NodeState | None:
    if value is None:
        return None
    try:
        return NodeState(value)
    except ValueError:
        raise AgentError(f"query parameter until must be a node state ({', '.join(s.value for s in NodeState)})") from None


def _known(request: web.Request, *names: str) -> None:
    """Refuse a query parameter the endpoint does not take (a typo would otherwise be ignored)."""
    unknown = sorted(set(request.query) - set(names))
    if unknown:
        takes = f"it takes {', '.join(names)}" if names else "it takes none"
        raise AgentError(f"unknown query parameter {unknown[0][:40]!r} for {request.method} "
                         f"{request.match_info.route.resource.canonical if request.match_info.route.resource else request.path}: {takes}")
    for name in names:
        if len(request.query.getall(name, [])) > 1:
            raise AgentError(f"query parameter {name} is given more than once")


def _number(request: web.Request, name: str) -> float:
    """A numeric query parameter, finite and within LIMITS[name] (an integer where it counts things)."""
    low, high, default = LIMITS[name]
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text) if name in INTEGERS else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low <= value <= high:
        kind = "a whole number" if name in INTEGERS else "a number of seconds"
        raise AgentError(f"query parameter {name}={text[:40]!r}: give {kind} from {low:g} to {high:g}")
    return value


async def serve(config: AgentConfig, socket_path: Path, group: str | None = "hearth",
                ready: asyncio.Event | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT (or cancellation). Bad settings are refused before anything is made."""
    preflight(config)
    _claim(socket_path)
    _warm_up()
    agent = HostAgent(config)
    await agent.start()
    # a request still open after 5 s (a VM's boot, which goes on as the agent's task) is cut: the agent's own
    # restart must not wait on its callers, whose leases run down meanwhile
    runner = web.AppRunner(app(agent), handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.UnixSite(runner, str(socket_path))
        await site.start()
        os.chmod(socket_path, 0o660)
        if group:
            with contextlib.suppress(KeyError):
                os.chown(socket_path, -1, grp.getgrnam(group).gr_gid)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"hearth agent: serving on {socket_path} (state {config.state_dir}, host root {config.host_root}, "
              f"{len(agent.vms)} VMs adopted)", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        agent.end_watches()
        await runner.cleanup()
        await agent.close()
        socket_path.unlink(missing_ok=True)


def _warm_up() -> None:
    """Import now what a VM's first API call would (httpx's transport, anyio's asyncio backend), so that a
    host's first VMs boot like its others and a burst of boots on a fresh agent does not wait on imports. And
    follow VMMs by pidfd, as Python 3.12 does by default: 3.11's default starts a thread per VMM to wait for it."""
    if sys.version_info < (3, 12):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    import httpcore  # noqa: F401

    with contextlib.suppress(ImportError):
        importlib.import_module("anyio._backends._asyncio")


def _claim(path: Path) -> None:
    """Make the socket's directory; refuse when another agent answers on the socket, clear a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise AgentError(f"another hearth agent serves {path}: stop it first (systemctl stop hearth-agent)")
        finally:
            probe.close()


def spawn(socket_path: Path, state_dir: Path, run_dir: Path, *, host_root: Path = Path("/"),
          cloud_hypervisor: str = "cloud-hypervisor", bridge: str | None = None, subnet: str | None = None,
          log: Path | None = None, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `hearth agent` as a process of its own (benchmarks and tests; hosts use the systemd unit) and
    return once it says it serves (its output goes to `log`, default `<state_dir>.log`)."""
    argv = [sys.executable, "-m", "provisioner.cli", "agent", "--socket", str(socket_path), "--state-dir",
            str(state_dir), "--run-dir", str(run_dir), "--host-root", str(host_root),
            "--cloud-hypervisor", cloud_hypervisor]
    if bridge:
        argv += ["--bridge", bridge, "--subnet", str(subnet)]
    log = log or state_dir.with_name(state_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=None if env is None else {**os.environ, **env})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = log.read_bytes()[start:].decode(errors="replace")
        if "hearth agent: serving on" in said:
            return process
        if process.poll() is not None:
            raise AgentError(f"hearth agent exited with status {process.returncode}: {said.strip()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise AgentError(f"hearth agent did not serve {socket_path} within {timeout:g} s")
