"""The real guest agent (guest/agent.py), run on this host in its hosted mode against a host end this test
plays: what it refuses, how it reconnects, what it makes of garbage, and that its "power off" ends its own
process group and nothing else. (Booted as PID 1 of a real VM it is tested in test_guest.py and
test_backends.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENT = str(Path(__file__).parents[1] / "guest/agent.py")


class HostEnd:
    """The host side of one VM's guest channel: a Unix socket at `<vsock socket>_1024`, as CH maps vsock."""

    def __init__(self, vsock: Path) -> None:
        self.path = Path(f"{vsock}_1024")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen()
        self.server.settimeout(30)
        self.conn: socket.socket | None = None
        self.lines: list[dict] = []
        self._buffer = b""

    def accept(self) -> None:
        self.conn, _ = self.server.accept()
        self.conn.settimeout(30)
        self._buffer = b""

    def expect(self, op: str, within: float = 30) -> dict:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            while b"\n" not in self._buffer:
                chunk = self.conn.recv(65536)
                assert chunk, f"the guest closed the channel while we waited for {op!r}"
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            self.lines.append(message)
            if message.get("op") == op:
                return message
        raise AssertionError(f"no {op!r} from the guest within {within} s: {self.lines}")

    def send(self, raw: bytes) -> None:
        self.conn.sendall(raw)

    def config(self, **overrides) -> None:
        config = {"op": "config", "node": "n-0", "ray": {"address": "127.0.0.1:9", "token": "not-a-secret"},
                  "env": {}, "network": None, "reconnect_s": 30, **overrides}
        self.send(json.dumps(config).encode() + b"\n")

    def drop(self) -> None:
        self.conn.close()
        self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def host_end(run_dir):
    end = HostEnd(run_dir / "vsock.sock")
    yield end
    end.close()


def hosted(run_dir: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "HEARTH_GUEST_HOSTED": str(run_dir / "vsock.sock"),
                   "HEARTH_SMBIOS_OEM": "hearth-node=n-0", "HEARTH_GUEST_TMP": str(run_dir / "disk"), **env}
    (run_dir / "disk").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, AGENT], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def group_alive(pgid: int, settle: float = 5.0) -> bool:
    """Whether any process of group `pgid` is left, once killed ones had `settle` seconds to be reaped."""
    deadline = time.monotonic() + settle
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def test_on_a_host_it_refuses_to_run_unless_the_stand_in_starts_it(run_dir):
    environment = {k: v for k, v in os.environ.items() if k != "HEARTH_GUEST_HOSTED"}
    refused = subprocess.run([sys.executable, AGENT], env=environment, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "only cloud-hypervisor-standin runs it, with HEARTH_GUEST_HOSTED" in refused.stderr
    # hosted, but sharing our process group: its power off would end us too, so it must not run
    shared = subprocess.run([sys.executable, AGENT], env={**environment, "HEARTH_GUEST_HOSTED": str(run_dir / "v")},
                            capture_output=True, text=True, timeout=30)
    assert shared.returncode == 1 and "must lead its own process group" in shared.stderr
    assert not list(run_dir.iterdir())  # it made nothing


def test_hello_config_and_a_failure_reported_with_the_processes_own_words(run_dir, host_end):
    agent = hosted(run_dir)
    host_end.accept()
    hello = host_end.expect("hello")
    assert hello["node"] == "n-0" and hello["gpus"] == [] and set(hello["phases"]) == {"kernel_s", "agent_s"}
    host_end.config(env={"PYTHONHOME": "/nonexistent"})  # `ray start`'s Python cannot even start
    failed = host_end.expect("failed")
    assert failed["detail"].startswith("ray start exited with status 1: ") and "encodings" in failed["detail"]
    assert agent.wait(30) == -signal.SIGKILL  # hosted power off: its own process group, itself included
    output = agent.stdout.read()
    assert "powering off (hosted: ending this guest's own process group)" in output
    assert not group_alive(agent.pid) and not (run_dir / "disk").exists()


def test_garbage_on_the_channel_is_skipped_and_stop_is_still_obeyed(run_dir, host_end):
    agent = hosted(run_dir)
    host_end.accept()
    host_end.expect("hello")
    host_end.send(b"not json at all\n[1, 2, 3]\n\"a string\"\n{\"op\": \n")
    host_end.config(ray={"address": "127.0.0.1:9", "token": "not-a-secret"})  # a head nobody serves: it waits
    host_end.expect("heartbeat")
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)  # another group on this host
    host_end.send(b"\x00\xff garbage \xfe\n{}\n" + b"x" * 100_000 + b"\n")
    host_end.expect("heartbeat")  # still serving after all that
    assert agent.poll() is None and group_alive(agent.pid)
    host_end.send(json.dumps({"op": "stop"}).encode() + b"\n")
    assert agent.wait(30) == -signal.SIGKILL
    output = agent.stdout.read()
    assert "skipped a guest channel line that is not a JSON object" in output
    assert "powering off (hosted: ending this guest's own process group): told to stop" in output
    assert not group_alive(agent.pid)  # `ray start`, still trying to join, went with it
    assert bystander.poll() is None  # nothing outside its group was touched
    bystander.kill()
    bystander.wait()


def test_it_reconnects_and_says_hello_again_then_gives_up_after_reconnect_s(run_dir, host_end):
    agent = hosted(run_dir)
    host_end.accept()
    host_end.expect("hello")
    host_end.config(reconnect_s=3)
    host_end.expect("heartbeat")
    host_end.drop()  # a host agent restarting: its listener comes back
    host_end.accept()
    again = host_end.expect("hello")
    assert again["node"] == "n-0"
    host_end.config(reconnect_s=3)
    host_end.expect("heartbeat")
    host_end.close()  # this time it stays away
    gone = time.monotonic()
    assert agent.wait(30) == -signal.SIGKILL
    took = time.monotonic() - gone
    assert 3 <= took < 15, took
    output = agent.stdout.read()
    assert "connected to the host end" in output and "the host end went away; reconnecting" in output
    assert "the host end has been gone for 3 s" in output


def test_its_vmm_gone_powers_it_off(run_dir, host_end):
    """The stand-in SIGKILLed: a hosted guest must not outlive its VM."""
    vmm = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
env = dict(os.environ, HEARTH_GUEST_HOSTED={str(run_dir / 'vsock.sock')!r}, HEARTH_SMBIOS_OEM='hearth-node=n-0')
guest = subprocess.Popen([sys.executable, {AGENT!r}], env=env, start_new_session=True)
print(guest.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    guest = int(vmm.stdout.readline())
    host_end.accept()
    host_end.expect("hello")
    host_end.config()
    host_end.expect("heartbeat")
    vmm.kill()
    vmm.wait()
    assert not group_alive(guest, settle=15), "a hosted guest outlived its VMM"
