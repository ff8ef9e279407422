"""The environment image (envimage.py) and its delivery to hosts (envstore.py, AgentClient.send_env).

Packing uses real erofs-utils; the image is mounted read-only on a loop device here (as root) and the
packed interpreter runs Ray from it. Delivery goes to real host agents (on the cloud-hypervisor STAND-IN,
which plays no part here) through their socket and through a real OpenSSH server on loopback; dropped and
corrupted transfers are made by a transport wrapper that breaks or alters the upload's body on the way.
Figures (pack time cold and cached, sizes, throughput) are printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import httpx
import pytest

from provisioner.agent.client import connect
from provisioner.agent.envstore import EnvStore, EnvStoreError
from provisioner.envimage import DEFAULT_MAX_BYTES, KEEP_LOCAL, environment, images, lookup, pack, prune
from provisioner.errors import AgentRefused, EnvError
from provisioner.hosts import Host, Inventory

pytestmark = pytest.mark.slow

ROOT = os.geteuid() == 0
GUEST_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")  # Debian's, as in the guest
FIGURES: list[str] = []


class _Figures:
    """Prints FIGURES in pytest's terminal summary (registered as a plugin by the fixture below)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if FIGURES:
            terminalreporter.write_sep("-", "env image figures")
            for line in FIGURES:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _figures(request):
    if not request.config.pluginmanager.has_plugin("hearth-env-figures"):
        request.config.pluginmanager.register(_Figures(), "hearth-env-figures")


def mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def snapshot(directory: Path) -> list[str] | None:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else None


# -- the environment image -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """This test venv (Ray, Jupyter, hearth editable), packed cold into a fresh cache ($XDG_CACHE_HOME/hearth/env
    for an XDG_CACHE_HOME of its own)."""
    cache = tmp_path_factory.mktemp("xdg") / "hearth" / "env"
    result = pack(cache=cache)
    site = Path(result.environment.site_packages[0])
    FIGURES.append(f"this .venv: site-packages {mib(tree_bytes(site))}, {sum(1 for _ in site.rglob('*'))} entries; "
                   f"image {mib(result.image.size)} (interpreter {result.image.meta['interpreter']}); "
                   f"cold pack {result.seconds:.1f} s (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return result


def test_pack_this_venv_then_find_it_cached(packed):
    image = packed.image
    assert not packed.cached and image.path.exists() and sha256_of(image.path) == image.sha256
    assert image.path.stat().st_mode & 0o777 == 0o444
    assert image.path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in image.path.parent.iterdir() if p.name.startswith(".pack-")] == []  # no staging left
    assert image.meta["interpreter"] == "shipped" and image.meta["python"] == ".".join(map(str, sys.version_info[:3]))
    assert image.meta["distributions"]["ray"] == distribution("ray").version
    again = pack(cache=image.path.parent)
    assert again.cached and again.image == image  # same key, same file: nothing packed
    started = time.perf_counter()
    key = environment().key
    decided = time.perf_counter() - started
    assert key == image.key
    FIGURES.append(f"cached: pack() {again.seconds:.3f} s in all; the key alone {decided:.3f} s")


def test_hearth_env_pack_ls_prune(packed):
    cache = packed.image.path.parent
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent), "COLUMNS": "200"}
    hearth = str(Path(sys.executable).with_name("hearth"))

    def run(*args: str) -> str:
        done = subprocess.run([hearth, "env", *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    found = json.loads(run("pack", "--json"))
    assert found["cached"] and found["key"] == packed.image.key and found["sha256"] == packed.image.sha256
    assert found["interpreter"] == "shipped" and found["size"] == packed.image.size
    assert f"env image {packed.image.key[:12]}: " in run("pack") and "already packed" in run("pack")
    stale = "0" * 64
    (cache / f"{stale}.img").write_bytes(b"old")
    (cache / f"{stale}.json").write_text(json.dumps({"sha256": stale, "size": 3, "packed_at": 1}))
    listed = json.loads(run("ls", "--json"))
    assert [(r["key"], r["current"]) for r in listed] == [(stale, False), (packed.image.key, True)]
    assert json.loads(run("prune", "--json")) == {"local": [stale], "hosts": []}
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        f"{packed.image.key}.img", f"{packed.image.key}.json"]


@pytest.mark.root("mounting a loop device needs root")
def test_the_image_mounts_read_only_and_runs_ray_from_there(packed, tmp_path):
    with mounted(packed.image.path, tmp_path / "env") as mount:
        meta = json.loads((mount / "hearth-env.json").read_text())
        assert meta["key"] == packed.image.key and meta["site_packages"] == "lib/python3.11/site-packages"
        probe = ("import sys, ray, provisioner, typer; "
                 "print(sys.prefix, sys.version.split()[0], ray.__file__, provisioner.__file__, typer.__file__)")
        started = time.perf_counter()
        out = subprocess.run([mount / "bin/python3", "-c", probe], capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path)
        FIGURES.append(f"`import ray` from the mounted image, cold: {time.perf_counter() - started:.2f} s")
        assert out.returncode == 0, out.stderr
        prefix, version, *files = out.stdout.split()
        assert prefix == str(mount) and version == ".".join(map(str, sys.version_info[:3]))
        assert all(f.startswith(f"{mount}/lib/python3.11/site-packages/") for f in files), files
        # the .pyc files still match their sources: erofs kept the modification times
        source = mount / "lib/python3.11/site-packages/ray/__init__.py"
        cached = source.parent / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
        assert struct.unpack("<I", cached.read_bytes()[8:12])[0] == int(source.stat().st_mtime)
        with pytest.raises(OSError):
            (mount / "lib/python3.11/site-packages/probe").write_text("read-only")


class mounted:
    def __init__(self, image: Path, where: Path) -> None:
        self.image, self.where = image, where

    def __enter__(self) -> Path:
        self.where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(self.image), str(self.where)], check=True)
        return self.where

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", str(self.where)], check=True)


@pytest.fixture
def small(tmp_path):
    """A small venv made here: a pure-Python package (idna), one with a compiled extension (markupsafe), both
    copied in as pip installed them, and a path install (a .pth naming a source directory outside it)."""
    prefix = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(prefix)],
                   check=True)
    site = prefix / "lib/python3.11/site-packages"
    for name in ("idna", "markupsafe"):
        install_copy(name, site)
    source = tmp_path / "src"
    source.mkdir()
    (source / "mylib.py").write_text("VALUE = 1\n")
    (site / "mylib.pth").write_text(f"{source}\n")
    return prefix


def install_copy(name: str, site: Path) -> None:
    dist = distribution(name)
    for file in dist.files:
        if not str(file).startswith(".."):
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(file), target)


def uninstall(name: str, site: Path) -> None:
    for line in next(site.glob(f"{name}-*.dist-info")).joinpath("RECORD").read_text().splitlines():
        (site / line.split(",")[0]).unlink(missing_ok=True)
    for directory in sorted(site.glob(f"{name}*"), reverse=True):
        shutil.rmtree(directory)


def test_a_changed_environment_gets_a_new_key(small, tmp_path):
    site = small / "lib/python3.11/site-packages"
    first = environment(small)
    assert environment(small).key == first.key
    assert {d.name.lower() for d in first.dists} == {"idna", "markupsafe"}
    assert [t.target for t in first.trees] == ["paths/0-src"] and first.pth["mylib.pth"] == "../../../paths/0-src\n"
    install_copy("six", site)
    installed = environment(small).key
    uninstall("six", site)
    assert installed != first.key and environment(small).key == first.key  # back as it was
    (tmp_path / "src/__pycache__").mkdir()
    (tmp_path / "src/__pycache__/mylib.cpython-311.pyc").write_bytes(b"not part of the key")
    assert environment(small).key == first.key
    (tmp_path / "src/mylib.py").write_text("VALUE = 2\n")  # an edit to a path install's source
    assert environment(small).key not in (first.key, installed)
    assert environment(small, with_interpreter=False).key != environment(small).key


@pytest.mark.root("mounting a loop device needs root")
def test_without_the_interpreter_the_image_is_a_venv_over_the_guests_python(small, tmp_path):
    """The other layout: no interpreter inside, bin/python3 is the guest's own Python (Debian bookworm's, here
    the same /usr/bin/python3.11 as in the guest image) with the image's site-packages."""
    assert GUEST_PYTHON.exists(), f"{GUEST_PYTHON} is Debian's python3 (scripts/test installs it)"
    result = pack(small, cache=tmp_path / "cache", with_interpreter=False)
    assert result.image.meta["interpreter"] == "guest"
    with mounted(result.image.path, tmp_path / "env") as mount:
        assert os.readlink(mount / "bin/python3.11") == str(GUEST_PYTHON)
        probe = "import sys, idna, markupsafe._speedups, mylib; print(sys.version.split()[0], mylib.VALUE, mylib.__file__)"
        out = subprocess.run([mount / "bin/python3", "-c", probe], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        version, value, where = out.stdout.split()
    guest = subprocess.run([GUEST_PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                           text=True).stdout.strip()
    assert version == guest and value == "1" and where == f"{mount}/paths/0-src/mylib.py"


def test_the_running_interpreter_ships_and_a_distributions_does_not(tmp_path):
    env = environment()
    assert env.interpreter.shipped, env.interpreter.reason
    assert GUEST_PYTHON.exists(), f"{GUEST_PYTHON} is Debian's python3 (scripts/test installs it)"
    out = subprocess.run([GUEST_PYTHON, "-c", "from provisioner.interpreter import interpreter; i = interpreter(); "
                          "print(i.shipped, i.reason)"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.startswith("False /usr is a distribution's own Python"), out.stdout + out.stderr


def test_refusals_name_the_problem_and_the_fix_and_write_nothing(small, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "unrelated.img").write_bytes(b"x")
    before = snapshot(cache)
    nowhere = tmp_path / "not-made" / "cache"

    other = tmp_path / "guest-3.12"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"inputs": {"suite": "bookworm", "python": "3.12"}}))
    for where in (cache, nowhere):
        with pytest.raises(EnvError) as refused:
            pack(small, image=other, cache=where)
        assert "runs Python 3.12" in str(refused.value) and f"Python {environment(small).interpreter.version}" in str(
            refused.value)
        assert "run the notebook from a Python 3.12 environment" in str(refused.value)

    site = small / "lib/python3.11/site-packages"
    info = site / "fastlib-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastlib\nVersion: 1.0\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                                "Tag: cp311-cp311-manylinux_2_39_x86_64\n")
    (info / "RECORD").write_text("fastlib-1.0.dist-info/METADATA,,\nfastlib-1.0.dist-info/WHEEL,,\n"
                                 "fastlib-1.0.dist-info/RECORD,,\n")
    with pytest.raises(EnvError) as refused:
        pack(small, cache=cache)
    message = str(refused.value)
    assert "fastlib 1.0 needs glibc 2.39 (manylinux_2_39_x86_64)" in message
    assert "Debian bookworm) has glibc 2.36" in message and "--platform manylinux_2_36_x86_64" in message
    shutil.rmtree(info)

    with pytest.raises(EnvError) as refused:
        pack(small, cache=nowhere, max_bytes=64 << 10)
    message = str(refused.value)
    assert "the environment holds" in message and "the cap is 0.1 MiB" in message
    assert "the largest: " in message and "MarkupSafe 3" in message and "--max-size" in message
    assert snapshot(cache) == before and not nowhere.parent.exists()  # nothing written, not even the cache
    assert pack(small, cache=cache).image.size > 0  # and with nothing wrong it packs
    assert DEFAULT_MAX_BYTES == 8 << 30


def test_prune_keeps_the_current_image(small, tmp_path):
    cache = tmp_path / "cache"
    kept = pack(small, cache=cache)
    (tmp_path / "src/mylib.py").write_text("VALUE = 3\n")
    changed = pack(small, cache=cache)
    assert changed.image.key != kept.image.key and lookup(cache, kept.image.key) is not None
    assert prune(cache, keep={changed.image.key}) == [kept.image.key]
    assert lookup(cache, kept.image.key) is None and lookup(cache, changed.image.key) is not None


def test_the_cache_keeps_the_images_last_packed_or_found(small, tmp_path):
    """Each changed environment packs a new image: the cache keeps the last KEEP_LOCAL packed or found."""
    cache = tmp_path / "cache"
    keys = []
    for value in range(KEEP_LOCAL):
        (tmp_path / "src/mylib.py").write_text(f"VALUE = {value}\n")
        keys.append(pack(small, cache=cache).image.key)
        time.sleep(0.01)  # mtimes order them
    (tmp_path / "src/mylib.py").write_text("VALUE = 0\n")
    assert pack(small, cache=cache).cached  # the first one, found again: now the most recent
    (tmp_path / "src/mylib.py").write_text("VALUE = 99\n")
    newest = pack(small, cache=cache).image.key
    assert {i.key for i in images(cache)} == {keys[0], *keys[2:], newest}  # the least recent (keys[1]) went
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        f"{k}.{ext}" for k in (keys[0], *keys[2:], newest) for ext in ("img", "json"))


def test_a_cache_others_can_write_to_is_refused(small, tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(EnvError, match="others can write to it"):
        pack(small, cache=cache)
    assert list(cache.iterdir()) == []


# -- delivery to hosts -----------------------------------------------------------------------------------------
@pytest.fixture
def blob(tmp_path):
    """An env image stand-in (the agent does not look inside): 24 MiB of random bytes."""
    path = tmp_path / "blob.img"
    path.write_bytes(os.urandom(24 << 20))
    return path, sha256_of(path)


def through_ssh(host: Host, sshd) -> Host:
    return host.model_copy(update={"address": sshd["address"], "ssh_identity": sshd["identity"],
                                   "ssh_known_hosts": sshd["known_hosts"]})


class Tamper(httpx.AsyncBaseTransport):
    """Wraps a client's transport; the first upload's body is cut after `after` bytes (`cut`), has the byte
    there flipped (`flip`), or stops there until `resume` is set (`pause`), as the network or a crash would."""

    def __init__(self, inner: httpx.AsyncBaseTransport, after: int, how: str) -> None:
        self.inner, self.after, self.how, self.done = inner, after, how, False
        self.paused, self.resume = asyncio.Event(), asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not self.done:
            self.done = True
            request.stream = _Stream(self._body(request.stream))
        return await self.inner.handle_async_request(request)

    async def _body(self, stream):
        seen = 0
        async for chunk in stream:
            if seen <= self.after < seen + len(chunk):
                cut = self.after - seen
                if self.how == "flip":
                    chunk = chunk[:cut] + bytes([chunk[cut] ^ 0xFF]) + chunk[cut + 1:]
                else:
                    yield chunk[:cut]
                    if self.how == "cut":
                        raise httpx.WriteError("connection dropped (test)")
                    self.paused.set()
                    await self.resume.wait()
                    chunk = chunk[cut:]
            seen += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks) -> None:
        self.chunks = chunks

    def __aiter__(self):
        return self.chunks


def tamper(client, after: int, how: str) -> Tamper:
    client._http._transport = Tamper(client._http._transport, after, how)
    return client._http._transport


def envs_dir(agents, name: str) -> Path:
    return agents.state(name) / "envs"


@pytest.mark.parametrize("via", ["socket", "ssh"])
def test_send_once_then_nothing(agents, sshd, run_dir, blob, via):
    host = agents.start("a")
    host = through_ssh(host, sshd) if via == "ssh" else host
    path, sha = blob

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            return await client.send_env(path, sha), await client.send_env(path, sha), await client.envs()
        finally:
            await client.aclose()

    first, second, listed = asyncio.run(scenario())
    assert not first.already_there and first.bytes_sent == path.stat().st_size and first.resumed == 0
    assert second.already_there and second.bytes_sent == 0
    stored = envs_dir(agents, "a") / f"{sha}.img"
    assert sha256_of(stored) == sha and stored.stat().st_mode & 0o777 == 0o444
    assert listed["images"] == [{"sha256": sha, "complete": True, "size": path.stat().st_size}]
    assert sorted(p.name for p in envs_dir(agents, "a").iterdir()) == [f"{sha}.img"]


def test_a_connection_dropped_half_way_resumes_through_ssh(agents, sshd, run_dir, blob):
    host = through_ssh(agents.start("a"), sshd)
    path, sha = blob
    size = path.stat().st_size

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            tamper(client, size // 2, "cut")
            return await client.send_env(path, sha)
        finally:
            await client.aclose()

    sent = asyncio.run(scenario())
    assert sent.resumed >= 1 and not sent.already_there
    # the second attempt sent only what the agent lacked (from the start again, it would be size // 2 + size)
    assert size <= sent.bytes_sent <= size + size // 2 - (1 << 20)
    assert sha256_of(envs_dir(agents, "a") / f"{sha}.img") == sha
    assert [p.name for p in envs_dir(agents, "a").iterdir()] == [f"{sha}.img"]


def test_an_agent_killed_mid_upload_is_resumed_after_its_restart(agents, sshd, run_dir, blob):
    host = through_ssh(agents.start("a"), sshd)
    path, sha = blob
    size = path.stat().st_size
    part = envs_dir(agents, "a") / f"{sha}.{size}.part"

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            gate = tamper(client, size // 3, "pause")
            sending = asyncio.create_task(client.send_env(path, sha))
            await asyncio.wait_for(gate.paused.wait(), 60)
            for _ in range(100):  # what was sent has reached the agent's file
                if part.exists() and part.stat().st_size >= size // 4:
                    break
                await asyncio.sleep(0.05)
            await asyncio.to_thread(agents.stop, "a", 9)  # SIGKILL: no clean-up
            held = part.stat().st_size
            await asyncio.to_thread(agents.restart, "a")
            gate.resume.set()
            return held, await sending
        finally:
            await client.aclose()

    held, sent = asyncio.run(scenario())
    assert held > 0 and sent.resumed >= 1
    assert sent.bytes_sent <= 2 * size - held  # the rest was sent from what the agent had kept
    assert sha256_of(envs_dir(agents, "a") / f"{sha}.img") == sha and not part.exists()


def test_a_corrupted_transfer_is_refused_and_removed(agents, sshd, run_dir, blob):
    host = through_ssh(agents.start("a"), sshd)
    path, sha = blob

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            tamper(client, 12345, "flip")
            await client.send_env(path, sha)
        finally:
            await client.aclose()

    with pytest.raises(AgentRefused) as refused:
        asyncio.run(scenario())
    assert refused.value.status == 400
    assert f"env image {sha[:12]} arrived with sha256" in str(refused.value)
    assert "corrupted on the way and has been removed; send it again" in str(refused.value)
    assert list(envs_dir(agents, "a").iterdir()) == []


def test_no_room_is_refused_before_a_byte_is_written(agents, sshd, run_dir, blob, monkeypatch):
    monkeypatch.setenv("HEARTH_AGENT_ENV_MARGIN", "99.9%")
    host = through_ssh(agents.start("a"), sshd)
    path, sha = blob

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            await client.send_env(path, sha)
        finally:
            await client.aclose()

    with pytest.raises(AgentRefused) as refused:
        asyncio.run(scenario())
    assert refused.value.status == 507
    assert "needs 24.0 MiB more and this host has" in str(refused.value)
    assert "HEARTH_AGENT_ENV_MARGIN" in str(refused.value) and "hearth env prune --hosts" in str(refused.value)
    assert list(envs_dir(agents, "a").iterdir()) == []


def test_bad_uploads_are_refused(agents, run_dir, blob):
    host = agents.start("a")
    path, sha = blob
    data = path.read_bytes()
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(host.agent_socket)), base_url="http://agent", timeout=30)
    answer = http.put(f"/v1/envs/{sha}", content=data[:10])
    assert answer.status_code == 400 and "X-Hearth-Env-Size header" in answer.json()["error"]
    answer = http.put("/v1/envs/../../etc", content=b"x", headers={"X-Hearth-Env-Size": "1"})
    assert answer.status_code in (400, 404)
    answer = http.put(f"/v1/envs/{sha.upper()}", content=b"x", headers={"X-Hearth-Env-Size": "1"})
    assert answer.status_code == 400 and "64 lower-case hex digits" in answer.json()["error"]
    answer = http.put(f"/v1/envs/{sha}", params={"offset": 5}, content=data[5:10],
                      headers={"X-Hearth-Env-Size": str(len(data))})
    assert answer.status_code == 409 and "resume from offset 0" in answer.json()["error"]
    answer = http.put(f"/v1/envs/{sha}", content=data[:10], headers={"X-Hearth-Env-Size": str(len(data))})
    assert answer.status_code == 400 and "is not its size" in answer.json()["error"]

    def too_much():  # chunked: no Content-Length to check up front
        yield data[:10]
        yield data[10:20]

    answer = http.put(f"/v1/envs/{sha}", content=too_much(), headers={"X-Hearth-Env-Size": "15"})
    assert answer.status_code == 400 and "more bytes than its declared size 15" in answer.json()["error"]
    assert list(envs_dir(agents, "a").iterdir()) == []
    assert http.get(f"/v1/envs/{sha}").status_code == 404


def test_an_image_a_vm_uses_is_not_deleted(tmp_path, blob):
    path, sha = blob
    store = EnvStore(tmp_path / "envs")

    async def chunks():
        yield path.read_bytes()

    asyncio.run(store.receive(sha, 0, path.stat().st_size, chunks()))
    with pytest.raises(EnvStoreError, match="is used by a VM on this host") as refused:
        store.delete(sha, in_use={sha})
    assert refused.value.status == 409 and (tmp_path / "envs" / f"{sha}.img").exists()
    assert store.delete(sha, in_use=set())["bytes"] == path.stat().st_size
    assert list((tmp_path / "envs").iterdir()) == []


def test_a_vm_runs_from_the_env_image_its_host_holds(agents, run_dir, blob, tmp_path):
    """The agent attaches a node's env image read-only (the stand-in checks the disk is there at vm.boot), refuses
    a node whose image has not arrived, and keeps an image while a VM uses it."""
    path, sha = blob
    host = agents.start("a")
    image = tmp_path / "image"
    image.mkdir()
    for part in ("vmlinuz", "initrd.img", "rootfs.img"):
        (image / part).write_bytes(b"\0" * 4096)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(host.agent_socket)), base_url="http://agent", timeout=60)
    node = {"id": "n-0", "uid": "u1", "host": "a", "image": str(image),
            "ray": {"address": "127.0.0.1:1", "token": "not-a-secret"},
            "env_image": {"sha256": sha, "key": "0" * 64, "interpreter": "shipped"}}
    request = {"controller": "c1", "budget_s": 30, "node": node, "standin": {"guest": "builtin"}}
    early = http.put("/v1/vms/n-0", json=request)
    assert early.status_code == 400 and f"env image {sha[:12]} is not on this host" in early.json()["error"]

    async def send():
        client = await connect(host, run_dir / "fwd")
        try:
            await client.send_env(path, sha)
        finally:
            await client.aclose()

    asyncio.run(send())
    assert http.put("/v1/vms/n-0", json=request).status_code == 201
    vmm = httpx.Client(transport=httpx.HTTPTransport(uds=str(agents.vms("a") / "n-0" / "api.sock")),
                       base_url="http://localhost/api/v1/")
    disks = vmm.get("vm.info").json()["config"]["disks"]
    assert disks[1] == {"path": str(envs_dir(agents, "a") / f"{sha}.img"), "readonly": True, "id": "env"}
    kept = http.delete(f"/v1/envs/{sha}")
    assert kept.status_code == 409 and "is used by a VM on this host" in kept.json()["error"]
    assert http.delete("/v1/vms/n-0").status_code == 200
    assert http.delete(f"/v1/envs/{sha}").status_code == 200
    assert list(envs_dir(agents, "a").iterdir()) == []


def test_hosts_check_lists_env_images_and_prune_removes_them(agents, sshd, run_dir, blob, tmp_path):
    path, sha = blob
    hosts = [agents.start("a"), through_ssh(agents.start("b"), sshd)]
    inventory_file = tmp_path / "hosts.yaml"
    inventory_file.write_text(json.dumps(json.loads(Inventory(hosts=hosts).model_dump_json())))

    async def send():
        for host in hosts:
            client = await connect(host, run_dir / "fwd")
            try:
                await client.send_env(path, sha)
            finally:
                await client.aclose()

    asyncio.run(send())
    hearth = str(Path(sys.executable).with_name("hearth"))
    env = {**os.environ, "COLUMNS": "250"}
    check = subprocess.run([hearth, "hosts", "check", "--hosts", str(inventory_file), "--json"], capture_output=True,
                           text=True, env=env, timeout=120)
    rows = {r["host"]: r for r in json.loads(check.stdout)}
    assert all(rows[h]["envs"] == [{"sha256": sha, "complete": True, "size": path.stat().st_size}] for h in "ab")
    table = subprocess.run([hearth, "hosts", "check", "--hosts", str(inventory_file)], capture_output=True, text=True,
                           env=env, timeout=120).stdout
    assert f"{sha[:12]} 24 MiB" in table
    pruned = subprocess.run([hearth, "env", "prune", "--hosts", str(inventory_file), "--json"], capture_output=True,
                            text=True, env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, timeout=120)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    rows = json.loads(pruned.stdout)["hosts"]
    assert [(r["host"], r["removed"], r["problem"]) for r in rows] == [("a", [sha], None), ("b", [sha], None)]
    assert list(envs_dir(agents, "a").iterdir()) == list(envs_dir(agents, "b").iterdir()) == []


def test_send_the_packed_venv_through_ssh(agents, sshd, run_dir, packed):
    host = through_ssh(agents.start("a"), sshd)
    image = packed.image

    async def scenario():
        client = await connect(host, run_dir / "fwd")
        try:
            return await client.send_env(image.path, image.sha256)
        finally:
            await client.aclose()

    sent = asyncio.run(scenario())
    assert sent.bytes_sent == image.size and sha256_of(envs_dir(agents, "a") / f"{image.sha256}.img") == image.sha256
    FIGURES.append(f"sent {mib(image.size)} through the SSH forward in {sent.seconds:.1f} s: "
                   f"{image.size / sent.seconds / (1 << 20):.0f} MiB/s")
