"""Quantize one matrix to a format and print its size, bits per weight, RMSE and max error.

  python scripts/quantize.py --fmt q4_k                               # synthetic 256 x 4096, normal
  python scripts/quantize.py --fmt q8_0 --dist outliers --rows 64 --cols 1024 --seed 1
  python scripts/quantize.py --fmt q6_k --gguf model.gguf --tensor blk.0.ffn_down_exps.weight

A GGUF tensor stored quantized is first dequantized (gguf.quants) to the float input.
Errors are computed in float64 against that float32 input.
"""
import os

import gguf
import jax
import numpy as np
from absl import app, flags

import numlab.formats as formats

DISTS = ("normal", "student_t", "outliers")
FLAGS = flags.FLAGS
flags.DEFINE_enum("fmt", "q4_k", formats.FORMATS, "format to quantize to")
flags.DEFINE_string("gguf", None, "GGUF file to read the tensor from (with --tensor)")
flags.DEFINE_string("tensor", None, "tensor name in the GGUF file, e.g. blk.0.ffn_down_exps.weight")
flags.DEFINE_integer("rows", 256, "synthetic matrix rows")
flags.DEFINE_integer("cols", 4096, "synthetic matrix columns (a multiple of the format's block size)")
flags.DEFINE_enum("dist", "normal", DISTS, "synthetic values: normal, Student-t (3 dof), or normal "
                  "with 1% of the values scaled by 100")
flags.DEFINE_integer("seed", 0, "synthetic matrix seed")


def synthetic(rows: int, cols: int, dist: str, seed: int) -> np.ndarray:
    """float32 [rows, cols] drawn from `dist`."""
    rng = np.random.default_rng(seed)
    if dist == "student_t":
        x = rng.standard_t(3, (rows, cols))
    else:
        x = rng.standard_normal((rows, cols))
        if dist == "outliers":
            x = np.where(rng.random((rows, cols)) < 0.01, 100 * x, x)
    return x.astype(np.float32)


def gguf_tensor(path: str, name: str) -> np.ndarray:
    """The float32 values [..., cols] of tensor `name` in the GGUF file at `path`."""
    if not os.path.isfile(path):
        raise app.UsageError(f"--gguf {path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on a damaged file
        raise app.UsageError(f"--gguf {path}: not a readable GGUF file ({e})") from e
    tensors = {t.name: t for t in reader.tensors}
    if name not in tensors:
        names = sorted(tensors)
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise app.UsageError(f"--tensor {name!r} is not in {path}; tensors: {shown}")
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def measure(x: np.ndarray, fmt: str) -> dict:
    """Quantize x [..., n] to fmt (jitted) and compare the dequantized values with x in float64."""
    quantize = jax.jit(formats.quantize, static_argnums=1)
    raw = quantize(x, fmt)
    y = np.asarray(jax.jit(formats.dequantize, static_argnums=1)(raw, fmt), dtype=np.float64)
    err = y - x.astype(np.float64)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    rmse = float(np.sqrt(np.mean(np.square(err))))
    return {"bytes": int(raw.size), "float32_bytes": 4 * x.size, "bits_per_weight": 8 * raw.size / x.size,
            "rmse": rmse, "relative_rmse": rmse / rms if rms else float("nan"),
            "max_abs_error": float(np.max(np.abs(err))), "max_abs_input": float(np.max(np.abs(x)))}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a --flag")
    synthetic_flags = [f for f in ("rows", "cols", "dist", "seed") if FLAGS[f].present]
    if FLAGS.gguf or FLAGS.tensor:
        if not (FLAGS.gguf and FLAGS.tensor):
            raise app.UsageError("--gguf and --tensor go together")
        if synthetic_flags:
            raise app.UsageError(f"--{', --'.join(synthetic_flags)}: synthetic-matrix flags do not "
                                 "combine with --gguf/--tensor")
        x = gguf_tensor(FLAGS.gguf, FLAGS.tensor)
        source = f"{FLAGS.gguf}: {FLAGS.tensor}"
    else:
        if FLAGS.rows <= 0 or FLAGS.cols <= 0:
            raise app.UsageError(f"--rows {FLAGS.rows} and --cols {FLAGS.cols} must be positive")
        x = synthetic(FLAGS.rows, FLAGS.cols, FLAGS.dist, FLAGS.seed)
        source = f"synthetic {FLAGS.dist}, seed {FLAGS.seed}"
    s = formats.spec(FLAGS.fmt)
    if x.shape[-1] % s.block_size:
        raise app.UsageError(f"{source}: rows of {x.shape[-1]} values are not a multiple of the "
                             f"{FLAGS.fmt} block size {s.block_size}")
    r = measure(x, FLAGS.fmt)
    print(f"input    {source}, shape {tuple(x.shape)}, max |x| {r['max_abs_input']:.4g}")
    print(f"format   {FLAGS.fmt}: {s.block_size} values in {s.type_size} bytes per block")
    print(f"size     {r['bytes']:,} bytes (float32: {r['float32_bytes']:,} bytes)")
    print(f"bits/w   {r['bits_per_weight']:.4f}")
    print(f"RMSE     {r['rmse']:.4e} ({100 * r['relative_rmse']:.3f}% of the input RMS)")
    print(f"max err  {r['max_abs_error']:.4e}")


if __name__ == "__main__":
    app.run(main)
