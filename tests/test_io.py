"""numlab.io: a write that dies midway leaves the old file whole and no temporary behind; run
folders refuse to be overwritten unless asked; a chunked computation resumes from its saved chunks."""
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from numlab import io  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Crash(Exception):
    pass


def _crash_midway(f):
    f.write(b"half of the new ")
    f.flush()
    raise _Crash("power cut")


def test_crash_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "report.json"
    io.atomic_write_json(path, {"cosine": 0.94})
    with pytest.raises(_Crash):
        io._atomic_write(path, _crash_midway)
    assert json.loads(path.read_text()) == {"cosine": 0.94}
    assert os.listdir(tmp_path) == ["report.json"]


def test_crash_in_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    io.atomic_write_text(path, "old")

    def no_rename(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.txt"]


KILLED_WRITER = """
import os, sys
from numlab import io
def die(f):
    f.write(b"new")
    f.flush()
    os.kill(os.getpid(), 9)
io._atomic_write(sys.argv[1], die)
"""


def test_killed_writer_process_leaves_old_file(tmp_path):
    """A process killed (SIGKILL) after writing the temporary file, before the rename: old bytes stay."""
    path = tmp_path / "a.bin"
    io.atomic_write_bytes(path, b"old")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT)
    assert proc.returncode == -9
    assert path.read_bytes() == b"old"
    others = set(os.listdir(tmp_path)) - {"a.bin"}
    assert len(others) == 1 and all(n.startswith(".a.bin.") and n.endswith(".tmp") for n in others)


def test_writes_replace_content(tmp_path):
    path = tmp_path / "sub" / "x.json"
    io.atomic_write_json(path, {"a": np.arange(3), "b": np.float32(0.5), "c": float("nan"), "d": (1, 2)})
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": 0.5, "c": "nan", "d": [1, 2]}
    io.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_savefig_writes_png(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = io.atomic_savefig(fig, tmp_path / "plot.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["plot.png"]


def test_run_dir_refuses_to_overwrite(tmp_path):
    run = io.make_run_dir(tmp_path, "run1")
    assert run.is_dir()
    assert io.make_run_dir(tmp_path, "run1") == run  # empty: reusable
    (run / "report.json").write_text("{}")
    with pytest.raises(FileExistsError) as info:
        io.make_run_dir(tmp_path, "run1")
    msg = str(info.value)
    assert str(run) in msg and "--overwrite" in msg and "--out" in msg
    assert (run / "report.json").read_text() == "{}"
    assert io.make_run_dir(tmp_path, "run1", overwrite=True) == run


def _sweep(store, n_chunks, calls, die_at=None):
    """A chunked computation: chunk i holds squares of 4i..4i+3; stops with an error at die_at."""
    for i in range(n_chunks):
        if store.done(i):
            continue
        if i == die_at:
            raise _Crash(f"interrupted at chunk {i}")
        calls.append(i)
        x = np.arange(4 * i, 4 * i + 4)
        store.save(i, {"x": x, "sq": x.astype(np.float64) ** 2})
    return np.concatenate([store.load(i)["sq"] for i in range(n_chunks)])


def test_chunk_store_resumes_interrupted_sweep(tmp_path):
    calls = []
    with pytest.raises(_Crash):
        _sweep(io.ChunkStore(tmp_path / "chunks"), 5, calls, die_at=3)
    assert calls == [0, 1, 2]
    resumed = []
    result = _sweep(io.ChunkStore(tmp_path / "chunks"), 5, resumed)
    assert resumed == [3, 4]
    np.testing.assert_array_equal(result, np.arange(20.0) ** 2)
    loaded = io.ChunkStore(tmp_path / "chunks").load(2)
    assert loaded["x"].dtype == np.arange(1).dtype and list(loaded) == ["x", "sq"]


def test_chunk_store_crash_mid_save_leaves_chunk_undone(tmp_path, monkeypatch):
    store = io.ChunkStore(tmp_path)

    def crash(*args, **kwargs):
        raise _Crash("killed while writing")
    monkeypatch.setattr(io.np, "savez", crash)
    with pytest.raises(_Crash):
        store.save(0, {"a": np.ones(3)})
    assert not store.done(0) and os.listdir(tmp_path) == []
