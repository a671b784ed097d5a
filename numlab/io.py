"""Result files written atomically (temporary file, then rename), run folders that are never
overwritten by accident, and a chunk store that lets an interrupted sweep resume."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write bytes to path through a temporary file in the same folder and a rename."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    """Write UTF-8 text to path atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        return _jsonable(arr.tolist()) if arr.ndim else _jsonable(arr.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def atomic_write_json(path, obj) -> Path:
    """Write obj as indented JSON atomically; arrays become lists, non-finite floats strings."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_savefig(fig, path, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def make_run_dir(root, name: str, overwrite: bool = False) -> Path:
    """Create root/name for a run's results; an existing non-empty folder is an error unless overwrite."""
    path = Path(root) / name
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {path} already holds results; pass --overwrite to replace "
                              "them or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


class ChunkStore:
    """Finished chunks of a long computation, one .npz each, so a rerun skips what is done."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:06d}.npz"

    def done(self, index: int) -> bool:
        return self._path(index).exists()

    def save(self, index: int, arrays: dict) -> None:
        def write(f):
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        _atomic_write(self._path(index), write)

    def load(self, index: int) -> dict:
        with np.load(self._path(index)) as z:
            return {k: z[k] for k in z.files}
