"""The notebook's code and data on the nodes (codesync.py): what travels, and, with real Ray nodes, that a
module next to the notebook imports there and an edit to it is seen by the next Pool call. (The same on
VMs, with the environment image, is in test_guest.py.)"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from provisioner.codesync import CodeTree, activate
from provisioner.errors import SpecError


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    """A notebook's directory, as the kernel's working directory."""
    root = tmp_path / "nb"
    (root / "pkg").mkdir(parents=True)
    (root / "mylib.py").write_text("VALUE = 1\n")
    (root / "pkg/__init__.py").write_text("from .inner import X\n")
    (root / "pkg/inner.py").write_text("X = 'inner'\n")
    (root / "data.csv").write_text("a,b\n1,2\n")
    (root / "analysis.ipynb").write_text("{}")
    for ignored in ("__pycache__", ".git", ".ipynb_checkpoints", "build"):
        (root / ignored).mkdir()
        (root / ignored / "junk.py").write_text("junk\n")
    (root / "venv").mkdir()
    (root / "venv/pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / ".gitignore").write_text("build/\n*.log\nsecret.txt\n")
    (root / "run.log").write_text("ignored\n")
    (root / "secret.txt").write_text("ignored\n")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path / "state"))
    return root


def test_the_code_tree_is_what_git_would_send(notebook_dir):
    tree = CodeTree()
    files, paths = tree.files()
    assert sorted(n for n in files if not n.startswith("_modules/")) == [
        "analysis.ipynb", "data.csv", "mylib.py", "pkg/__init__.py", "pkg/inner.py"]
    assert paths[0] == "."
    first = tree.snapshot()
    assert tree.snapshot().hash == first.hash  # nothing changed: the same version
    time.sleep(0.01)
    (notebook_dir / "mylib.py").write_text("VALUE = 2\n")
    assert tree.snapshot().hash != first.hash  # an edit is a new version
    (notebook_dir / "run.log").write_text("ignored, still\n")
    (notebook_dir / "build/more.py").write_text("x\n")
    assert tree.snapshot().hash == tree.snapshot().hash


def test_too_much_to_send_is_refused_naming_the_largest_files(notebook_dir):
    (notebook_dir / "weights.bin").write_bytes(b"\0" * (3 << 20))
    (notebook_dir / "dataset.parquet").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(SpecError) as refused:
        CodeTree(cap=4 << 20).snapshot()
    text = str(refused.value)
    assert "over the 4 MiB cap" in text and "weights.bin (3.0 MiB), dataset.parquet (2.0 MiB)" in text
    assert ".gitignore" in text and "sync_code=False" in text


def test_a_node_activates_a_version_and_forgets_the_old_one(notebook_dir, tmp_path, monkeypatch):
    """What a worker does on its node, without Ray: fetch (here: the store is a dict), chdir, import, switch."""
    import io
    import tarfile

    from provisioner import codesync

    store: dict[str, bytes] = {}
    monkeypatch.setattr("ray.experimental.internal_kv._internal_kv_get",
                        lambda key, namespace=None: store.get(key))
    monkeypatch.setattr(codesync.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    (tmp_path / "node").mkdir()
    tree = CodeTree()
    versions = []
    for value in (1, 2):
        (notebook_dir / "mylib.py").write_text(f"VALUE = {value}\n")
        snapshot = tree.snapshot()
        store[f"code:{snapshot.hash}"] = codesync._tar(snapshot)
        versions.append(snapshot.hash)
    saved_path, saved_cwd = list(sys.path), os.getcwd()
    try:
        activate(versions[0])
        import mylib

        assert mylib.VALUE == 1 and open("data.csv").read() == "a,b\n1,2\n"
        assert Path(mylib.__file__).parent == tmp_path / "node" / f"hearth-code-{os.getuid()}" / versions[0]
        activate(versions[1])
        import mylib as again

        assert again.VALUE == 2 and "mylib" in sys.modules
        with tarfile.open(fileobj=io.BytesIO(store[f"code:{versions[1]}"])) as tar:
            assert "secret.txt" not in tar.getnames() and "build/junk.py" not in tar.getnames()
    finally:
        sys.modules.pop("mylib", None)
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        codesync._active.update(hash=None, dir=None, paths=[], shadowed=[])


@pytest.mark.slow
def test_pool_calls_run_in_the_notebooks_current_code(notebook_dir, run_dir, monkeypatch):
    """Local Ray nodes: a module next to the notebook, a package, a data file by relative path, a cell-defined
    function; then the module is edited and the next call sees it. A plain Ray task on the same cluster
    starts in the notebook's code too."""
    import ray

    from provisioner import Cluster, Pool

    monkeypatch.setenv("HEARTH_RUN_DIR", str(run_dir))
    monkeypatch.syspath_prepend(str(notebook_dir))

    def where_and_what(_):
        import mylib
        import pkg

        return os.getcwd() != str(notebook_dir), mylib.VALUE, pkg.X, open("data.csv").read().splitlines()[1]

    with Pool(min=0, max=2, name="sync", idle_shutdown_after=300) as pool:
        assert pool.map(where_and_what, range(2)) == [(True, 1, "inner", "1,2")] * 2
        time.sleep(0.01)
        (notebook_dir / "mylib.py").write_text("VALUE = 2\n")
        started = time.monotonic()
        assert pool.map(where_and_what, range(2)) == [(True, 2, "inner", "1,2")] * 2
        print(f"edit -> next map over 2 nodes: {time.monotonic() - started:.2f} s")
    assert not ray.is_initialized()

    with Cluster(nodes=1, name="plain", show=False) as cluster:
        value = ray.get(ray.remote(lambda: __import__("mylib").VALUE).options(
            label_selector={"hearth.io/node": cluster.nodes[0]["id"]}).remote())
        assert value == 2
