"""The stand-in VMM as benchmarks start it: forked from one process that imported it already (a zygote), so
that a VMM start costs a small process's start, as a native cloud-hypervisor's does, not a Python interpreter
importing the stand-in (some 30 ms of CPU each, which is most of a 256-node run's CPU on 2 cores).

What a host agent runs is still an executable named `cloud-hypervisor-standin` with CH's flags (`wrapper`), its
own child, in its own session, holding the event-monitor pipe the agent gave it:

    wrapper -> zygote   its argv and environment, and its stdin, stdout, stderr and `--event-monitor fd=N`
                        descriptors (SCM_RIGHTS); then the signals it gets (SIGTERM, SIGINT), one per line
    zygote              forks; the child takes those descriptors at the same numbers, the environment and argv,
                        and runs the stand-in's main(); a signal from the wrapper is raised in the child
    zygote -> wrapper   the child's exit status, which the wrapper exits with
    wrapper gone        (SIGKILL) the child sees its connection close and dies at once, as a killed VMM does

Only for benchmarks with the builtin guest (the stand-in's other guests are processes the child would leave
behind on a SIGKILL). Tests start the stand-in itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2]  # where the `provisioner` package is imported from

WRAPPER = """#!{python} -IS
import _signal, _socket, os, sys
fds = [0, 1, 2]
for flag, value in zip(sys.argv, sys.argv[1:]):
    if flag in ("--event-monitor", "--api-socket") and value.startswith("fd="):
        fds.append(int(value[3:]))
request = ("\\0".join(sys.argv) + "\\0\\0" + "\\0".join(k + "=" + v for k, v in os.environ.items())).encode()
request = b"%d %s\\n" % (len(request), " ".join(map(str, fds)).encode()) + request
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
s.connect({zygote!r})
s.sendmsg([request],
           [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, bytes(__import__("array").array("i", fds)))])
for fd in fds[3:]:
    os.close(fd)  # the VMM's end of the pipe now lives in the forked stand-in only
for sig in (_signal.SIGTERM, _signal.SIGINT):
    _signal.signal(sig, lambda number, frame: s.send(b"%d\\n" % number))
answer = b""
while not answer.endswith(b"\\n"):
    try:
        chunk = s.recv(64)
    except InterruptedError:
        continue
    if not chunk:
        os._exit(1)
    answer += chunk
os._exit(int(answer))
"""


def wrapper(directory: Path, zygote: Path) -> str:
    """Write the executable a host agent runs as the stand-in; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cloud-hypervisor-standin"
    path.write_text(WRAPPER.format(python=sys.executable, zygote=str(zygote)))
    path.chmod(0o755)
    return str(path)


def serve(path: str) -> None:
    """The zygote: import the stand-in, then fork one per connection until stdin ends."""
    import selectors

    from provisioner.ch import standin

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 1024):
                    return
            elif key.data == "child":
                os.read(wake_read, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    connection = children.pop(pid, None)
                    if connection is not None:
                        code = os.waitstatus_to_exitcode(status)
                        with_signal = 128 - code if code < 0 else code
                        try:
                            connection.send(b"%d\n" % with_signal)
                        except OSError:
                            pass
                        connection.close()
            else:
                connection, _ = listener.accept()
                pid = _fork(connection, standin, (listener, selector, wake_read, wake_write))
                if pid is None:
                    connection.close()
                else:
                    children[pid] = connection


def _fork(connection: socket.socket, standin, zygote_fds) -> int | None:
    """Read one request ("<length> <fd numbers>\\n" then argv, NUL NUL, environment) with its descriptors."""
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 64)
    while b"\n" not in message:
        if not (more := connection.recv(1 << 20)):
            return None
        message += more
    header, _, body = message.partition(b"\n")
    length, *numbers = map(int, header.split())
    while len(body) < length:
        if not (more := connection.recv(1 << 20)):
            return None
        body += more
    head = body
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    try:  # the stand-in VMM: never returns into the zygote's loop
        listener, selector, wake_read, wake_write = zygote_fds
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        selector.close()
        listener.close()
        os.close(wake_read)
        os.close(wake_write)
        os.setsid()
        import fcntl

        # Everything this child keeps goes out of the way of the numbers it must take (the wrapper's), first.
        connection = socket.socket(fileno=fcntl.fcntl(connection.detach(), fcntl.F_DUPFD_CLOEXEC, 900))
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 900) for fd in fds]
        for fd, target in zip(high, numbers):
            os.dup2(fd, target, inheritable=True)
        keep = {*numbers, connection.fileno()}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:  # the zygote's: its listener, other stand-ins' connections, these copies
                with contextlib.suppress(OSError):
                    os.close(fd)
        argv, _, env = head.partition(b"\0\0")
        os.environ.clear()
        os.environ.update(dict(item.split("=", 1) for item in env.decode().split("\0") if "=" in item))
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        import threading

        def follow() -> None:
            while True:
                try:
                    line = connection.recv(64)
                except OSError:
                    line = b""
                if not line:  # the wrapper is gone: SIGKILL, as a killed VMM dies
                    os.kill(os.getpid(), signal.SIGKILL)
                for number in line.split():
                    if number.isdigit():
                        os.kill(os.getpid(), int(number))

        threading.Thread(target=follow, daemon=True).start()
        standin.main(argv.decode().split("\0")[1:])
        os._exit(0)
    except SystemExit as end:
        os._exit(end.code if isinstance(end.code, int) else 0 if end.code is None else 1)
    except BaseException:  # noqa: BLE001 - say why, as the interpreter would
        import traceback

        traceback.print_exc()
        os._exit(1)


@contextlib.contextmanager
def forked_standins(directory: Path) -> Iterator[tuple[str, int]]:
    """A zygote for the run: (the executable to give host agents as their VMM, the zygote's pid, whose
    children are the stand-ins). It ends when the block does."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "zygote.sock"
    process = subprocess.Popen([sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, {str(SOURCE)!r}); "
                                f"from provisioner.ch.standin_zygote import serve; serve({str(path)!r})"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the stand-in zygote did not start (status {process.wait()})")
        yield wrapper(directory, path), process.pid
    finally:
        process.stdin.close()
        process.wait(30)
