"""The host agent's parts that need no root, no bridge and no VMM, and `hearth down`'s aim: fast.

    the guest channel   at most MAX_CONNECTIONS per VM, lines capped, garbage skipped
    the ledger          ttl finite and capped; a full disk refuses a lease before anything is recorded, and
                        audit lines it refused are written later, in order, so the log still replays
    kept logs           an ended VM's logs: tails only, the newest KEPT_VMS VMs only
    processes           a process named by a state file is signalled only while it is still that process
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner.agent import ledger as ledger_module
from provisioner.agent.keptlogs import KEPT_BYTES, KEPT_VMS, KeptLogs
from provisioner.agent.ledger import MAX_TTL_S, Ledger, StateDiskFull, VmLease, check_ttl
from provisioner.errors import AgentError
from provisioner.guest_channel import MAX_CONNECTIONS, MAX_LINE, GuestChannel
from provisioner.node import GuestConfig, RayJoin
from provisioner.processes import HeldProcess, recorded, start_ticks
from test_agent import never_leased_twice

HEARTH = str(Path(sys.executable).with_name("hearth"))


def test_a_guest_channel_takes_max_connections_and_skips_garbage(tmp_path):
    heard = []

    async def scenario():
        config = GuestConfig(node="n-0", ray=RayJoin(address="10.0.0.1:6379", token="not-a-secret"))
        channel = GuestChannel(tmp_path / "vsock.sock_1024", config, heard.append)
        await channel.start()
        opened = [await asyncio.open_unix_connection(str(channel.path)) for _ in range(MAX_CONNECTIONS + 3)]
        await asyncio.sleep(0.2)
        closed = []
        for reader, _ in opened:  # the connections over the cap are closed at once; the others wait
            try:
                closed.append(await asyncio.wait_for(reader.read(1), 0.2) == b"")
            except asyncio.TimeoutError:
                closed.append(False)
        for _, writer in opened:
            writer.close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_unix_connection(str(channel.path))
        writer.write(b"\xff\xfe not JSON\n[1, 2]\nnull\n{\"op\": 42}\n" + b"x" * (MAX_LINE + 10) + b"\n")
        await writer.drain()
        dropped = await asyncio.wait_for(reader.read(), 5) == b""  # the oversized line ends that connection
        reader, writer = await asyncio.open_unix_connection(str(channel.path))  # and the next one works
        writer.write(json.dumps({"op": "hello", "node": "n-0"}).encode() + b"\n")
        await writer.drain()
        config_line = json.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        await channel.close()
        return closed, dropped, config_line

    closed, dropped, config_line = asyncio.run(scenario())
    assert closed == [False] * MAX_CONNECTIONS + [True] * 3
    assert dropped and config_line["op"] == "config" and config_line["node"] == "n-0"
    assert [m.get("op") for m in heard] == [42, "hello"]  # objects reach the node; the rest is skipped


@pytest.mark.parametrize("ttl", [0, 0.5, -1, MAX_TTL_S + 1, float("nan"), float("inf"), "30"])
def test_a_lease_ttl_is_finite_and_capped(ttl):
    with pytest.raises(AgentError, match=f"a lease's ttl is 1 to {MAX_TTL_S:g} seconds"):
        check_ttl(ttl)


def _lease(vm_id: str, *gpus: str) -> VmLease:
    return VmLease(id=vm_id, controller="c", gpus=list(gpus), cid=3, created_at=time.time(), request={})


def test_a_full_disk_refuses_a_lease_and_the_audit_log_catches_up(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "state")
    ledger.reserve(_lease("a-0", "0000:18:00.0"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(ledger_module, "write_atomic", full)
        with pytest.raises(StateDiskFull, match="state directory .* is full .* free space there"):
            ledger.reserve(_lease("b-0", "0000:2a:00.0"))
        assert "b-0" not in ledger.vms and not (tmp_path / "state/vms/b-0.json").exists()
        assert ledger.holder("0000:2a:00.0") is None  # nothing was leased

    real_write = os.write
    with monkeypatch.context() as patched:  # the audit log's disk is full for a while: lines wait, in order
        patched.setattr(ledger_module.os, "write", full)
        ledger.release("a-0", "stopped")
        ledger.reserve(_lease("c-0", "0000:18:00.0"))
    assert "c-0" not in (tmp_path / "state/leases.log").read_text()
    assert os.write is real_write
    ledger.release("c-0", "stopped")  # room again: everything is written, in order
    ops = [(e["op"], e["subject"]) for e in map(json.loads, (tmp_path / "state/leases.log").read_text().splitlines())]
    assert ops == [("lease", "a-0"), ("release", "a-0"), ("lease", "c-0"), ("release", "c-0")]
    assert never_leased_twice(tmp_path / "state") == {}
    ledger.close()


def test_an_ended_vms_logs_are_kept_bounded(tmp_path):
    kept = KeptLogs(tmp_path / "ended")
    for index in range(KEPT_VMS + 8):
        run = tmp_path / "run" / f"n-{index}"
        run.mkdir(parents=True)
        (run / "serial.log").write_text("boot line\n" * 20000)  # 200 KB
        kept.keep(f"n-{index}", {"serial.log": run / "serial.log"})
        assert not (run / "serial.log").exists()  # off the run directory
        os.utime(tmp_path / "ended" / f"n-{index}", (index, index))
    names = {p.name for p in (tmp_path / "ended").iterdir()}
    assert len(names) == KEPT_VMS and "n-0" not in names and f"n-{KEPT_VMS + 7}" in names
    serial = kept.read(f"n-{KEPT_VMS + 7}")["serial.log"]
    assert len(serial) <= KEPT_BYTES + 100 and serial.startswith("[... ") and serial.endswith("boot line\n")


def test_a_recorded_process_is_found_only_while_it_is_the_same_one():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = recorded(sleeper.pid)
        assert record == {"pid": sleeper.pid, "start": start_ticks(sleeper.pid)}
        with HeldProcess.recorded(record) as held:
            assert held is not None and not held.wait(0)
        reused = {"pid": sleeper.pid, "start": record["start"] - 1}  # the pid, but another process's start
        assert HeldProcess.recorded(reused) is None
        assert HeldProcess.recorded({"pid": "1; rm -rf /", "start": 1}) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert HeldProcess.recorded(record) is None  # gone


def _state(tmp_path: Path, name: str, **state) -> Path:
    directory = tmp_path / "clusters" / name
    directory.parent.mkdir(mode=0o700, exist_ok=True)  # hearth uses only state directories of the user's own
    directory.mkdir(mode=0o700)
    (directory / "state.json").write_text(json.dumps({"name": name, "status": "ready", **state}))
    return directory


def _down(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([HEARTH, "down", "--name", name, "--timeout", "10"], capture_output=True, text=True,
                          env={**os.environ, "HEARTH_STATE_DIR": str(tmp_path)}, timeout=60)


def test_hearth_down_signals_only_the_process_its_state_file_recorded(tmp_path):
    """A state file whose supervisor ended and whose pid another process took since: that process is not
    signalled, whether the file records the start time or (an older file) only the pid; a live one is."""
    bystander = subprocess.Popen(["sleep", "60"])  # e.g. a notebook kernel that got the pid
    supervisor = subprocess.Popen(["sleep", "60"])  # stands in for a live supervisor, as its record names it
    try:
        stale = {"pid": bystander.pid, "start": start_ticks(bystander.pid) - 7}
        _state(tmp_path, "reused", pid=bystander.pid, process=stale)
        _state(tmp_path, "older", pid=bystander.pid)  # no start time: its command line must be a supervisor's
        for name in ("reused", "older"):
            done = _down(tmp_path, name)
            assert done.returncode == 0 and f"cluster {name} is not running" in done.stdout, done.stdout + done.stderr
        time.sleep(0.2)
        assert bystander.poll() is None  # untouched
        _state(tmp_path, "live", pid=supervisor.pid, process=recorded(supervisor.pid))
        done = _down(tmp_path, "live")
        assert done.returncode == 0 and "cluster live is down" in done.stdout, done.stdout + done.stderr
        assert supervisor.wait(5) == -signal.SIGTERM
    finally:
        for process in (bystander, supervisor):
            process.kill()
            process.wait()
