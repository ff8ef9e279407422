"""A pre-imported launcher for local Ray nodes: one process that has imported Ray's CLI forks each node's
`ray start` from itself, instead of a fresh interpreter importing Ray for every node.

A `ray start` spends a good part of its own CPU importing Ray (about a second on a loaded 2-core machine); a
fork of a process that imported it already costs milliseconds, and the forks share those pages. Every local
node of a cluster starts this way (backends/local.py), the command unchanged: `python -c <code> <args>`, as
`ray_head.ray_start()` builds it, runs as the code with those arguments in the forked child.

    controller -> launcher (stdin)    {"id": K, "argv": [python, "-c", code, ...], "env": {...}, "output": FIFO}
    launcher -> controller (stdout)   {"id": K, "pid": N}, and when N ends {"pid": N, "exit": status}

The launcher is single-threaded (a fork copies only the forking thread, and any lock another thread held stays
held in the child), dies with the controller (PR_SET_PDEATHSIG), and reaps its children. Each child leads a
session of its own (so `terminate` ends its process group, as with any other child), has the node's
environment, writes its output to the node's FIFO, and dies with the launcher.
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

from provisioner.processes import die_with_parent

PRELOAD = ("ray.scripts.scripts", "ray._private.services")  # what every `ray start` imports first


class LaunchedProcess:
    """A child of the launcher, as `terminate` and the local backend use a process: pid, returncode, wait(),
    stdout (the node's output, from its FIFO)."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()

    def _ended(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            self._exited.set_result(status)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class Launcher:
    """The controller's side: start the launcher once, then `launch` node commands through it."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._children: dict[int, LaunchedProcess] = {}
        self._early: dict[int, int] = {}  # exits reported before their launch reply was handled
        self._next = 0
        self._reader: asyncio.Task | None = None

    async def start(self, env: dict[str, str]) -> None:
        """Start the launcher with `env` (what Ray reads when it is imported comes from here)."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from provisioner.launcher import serve; serve()",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20,
            preexec_fn=die_with_parent)
        ready = json.loads(await self.process.stdout.readline() or b'{"error": "the launcher exited at start"}')
        if "error" in ready:
            await self.close()
            raise OSError(f"the node launcher could not start: {ready['error']}")
        self._reader = asyncio.create_task(self._read())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None and not (self._reader and self._reader.done())

    async def launch(self, argv: list[str], env: dict[str, str], fifo: Path) -> LaunchedProcess:
        """Run `argv` (`python -c CODE ARGS...`) forked from the launcher, its output to a new FIFO at `fifo`."""
        if len(argv) < 3 or argv[1] != "-c":
            raise ValueError(f"the launcher runs `python -c CODE ...` commands, not {argv[:2]}")
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened before the child's write end: no EOF race
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(fd, "rb"))
        self._next += 1
        reply = self._replies[self._next] = loop.create_future()
        self.process.stdin.write(json.dumps({"id": self._next, "argv": argv, "env": env, "output": str(fifo)}).encode()
                                 + b"\n")
        try:
            await self.process.stdin.drain()
            pid = await reply
        except BaseException:
            transport.close()
            fifo.unlink(missing_ok=True)
            raise
        child = self._children[pid] = LaunchedProcess(pid, stdout)
        if pid in self._early:
            child._ended(self._early.pop(pid))
        return child

    async def _read(self) -> None:
        try:
            async for line in self.process.stdout:
                message = json.loads(line)
                if "exit" in message:
                    child = self._children.pop(message["pid"], None)
                    if child is None:
                        self._early[message["pid"]] = message["exit"]
                    else:
                        child._ended(message["exit"])
                elif (future := self._replies.pop(message["id"], None)) is not None and not future.done():
                    if "error" in message:
                        future.set_exception(OSError(f"the node launcher could not start it: {message['error']}"))
                    else:
                        future.set_result(message["pid"])
        finally:  # the launcher is gone: its children went with it (PR_SET_PDEATHSIG)
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(OSError("the node launcher exited"))
            for child in self._children.values():
                child._ended(-signal.SIGTERM)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.stdin.close()  # it exits when its input ends, leaving its children to theirs
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


# -- the launcher process ------------------------------------------------------------------------
def serve() -> None:
    """Import Ray's CLI, say ready, then fork a child per request until stdin ends."""
    import importlib
    import selectors
    import threading

    out = os.fdopen(os.dup(1), "w", buffering=1)

    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")

    try:
        for module in PRELOAD:
            importlib.import_module(module)
        if threading.active_count() != 1:
            raise RuntimeError(f"importing Ray started {threading.active_count() - 1} threads: forking is unsafe")
    except Exception as error:  # noqa: BLE001 - said to the controller, which falls back to fresh interpreters
        say({"error": f"{type(error).__name__}: {error}"})
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.buffer.raw, selectors.EVENT_READ, "request")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    say({"ready": os.getpid()})
    requests = b""
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_read, 4096)
                _reap(say)
                continue
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                return
            requests += chunk
            while b"\n" in requests:
                line, requests = requests.split(b"\n", 1)
                request = json.loads(line)
                try:
                    say({"id": request["id"], "pid": _fork(request, out)})
                except OSError as error:
                    say({"id": request["id"], "error": str(error)})


def _reread_ray_config() -> None:
    """Ray's core read its config (the auth mode and token among it) when the launcher imported it, from the
    launcher's environment: read it again from the node's (as ray_head.RayHead.use_in_this_process does)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _reap(say) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        say({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _fork(request: dict[str, Any], out) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns into the launcher's loop
        os.setsid()
        die_with_parent()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(request["output"], os.O_WRONLY)
        with contextlib.suppress(OSError):
            os.unlink(request["output"])  # both ends are open now; nothing else needs its name
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.closerange(3, 1 << 16)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.clear()
        os.environ.update(request["env"])
        _reread_ray_config()
        argv = request["argv"]
        sys.argv = ["-c", *argv[3:]]
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - hearth's own command
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:  # noqa: BLE001 - say why, as the interpreter would have
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
