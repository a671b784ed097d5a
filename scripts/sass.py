"""A quantized product's Pallas kernels compiled for sm_90 on this machine (no GPU): registers, main-loop opcodes.

  python scripts/sass.py --fmt q4_k --act q8_1 --tokens 1                       # the tuned config
  python scripts/sass.py --fmt q8_0 --variant '' --variant lane_sums=true,rows=32 --out results/bench/sass-x.json

Each --variant replaces fields of the tuned kernel config (numlab.kernels.tuning.config_for, fitted to
the shape); '' is the tuned config itself. Needs pip's triton (pip install -e '.[sass]') and jaxlib 0.10,
which embeds the kernels' Triton IR when lowering for CUDA. Counts are a reading of the compiled code,
not timings: the device's XLA bundles its own Triton.
"""
import dataclasses
import importlib.util
import os
import tempfile

import xla_env  # noqa: F401  (before JAX starts)
import jax
from absl import app, flags

from numlab.bench import sass
from numlab.io import atomic_write_json
from numlab.kernels import qmatmul as qm, tuning

FLAGS = flags.FLAGS
flags.DEFINE_enum("fmt", "q4_k", list(qm.INT_ACTS), "weight format")
flags.DEFINE_string("act", "q8_1", "activation mode (numlab.kernels.acts_for(fmt): f32, bf16, f16, q8_1, q8_k or q8_0)")
flags.DEFINE_integer("tokens", 1, "activation rows")
flags.DEFINE_integer("rows", 4096, "weight rows")
flags.DEFINE_integer("cols", 14336, "weight columns (a multiple of 256)")
flags.DEFINE_multi_string("variant", [""], "Config fields replaced in the tuned config, e.g. 'rows=32,lane_sums=true'")
flags.DEFINE_string("out", None, "JSON output path (default: print only)")
flags.DEFINE_string("workdir", None, "directory for the .ttir, .cubin and .sass files (default: a temporary one)")

def compile_variant(cfg: qm.Config, workdir: str) -> list[dict]:
    """One row per Triton kernel of the product under cfg: resources, main loop and (for the product's own
    kernel) warp instructions of the main loop per weight row and chunk of 256 columns."""
    fn, args = sass.product(FLAGS.fmt, FLAGS.act, FLAGS.tokens, FLAGS.rows, FLAGS.cols, cfg)
    rows = []
    for k in sass.triton_kernels(fn, *args):
        compiled = sass.compile_sm90(k, workdir)
        loop, ops = sass.main_loop(compiled.pop("sass"))
        row = {"kernel": k.name, "num_warps": k.num_warps, "num_stages": k.num_stages, **compiled,
               "programs_per_multiprocessor": sass.programs_per_multiprocessor(compiled["registers"], k.num_warps),
               "main_loop_instructions_per_thread": loop, "main_loop_opcodes": ops}
        if k.name.startswith("qmatmul"):
            row["warp_instructions_per_row_and_chunk"] = round(loop * k.num_warps / (cfg.rows * cfg.unroll), 2)
        rows.append(row)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.act not in qm.acts_for(FLAGS.fmt):
        raise app.UsageError(f"--act {FLAGS.act!r} for {FLAGS.fmt}; valid: {', '.join(qm.acts_for(FLAGS.fmt))}")
    if FLAGS.tokens < 1 or FLAGS.rows < 1 or FLAGS.cols < qm.CHUNK or FLAGS.cols % qm.CHUNK:
        raise app.UsageError(f"--tokens {FLAGS.tokens}, --rows {FLAGS.rows} must be >= 1 and --cols {FLAGS.cols} "
                             f"a positive multiple of {qm.CHUNK}")
    tuned = qm.fit(tuning.config_for(FLAGS.fmt, FLAGS.act, FLAGS.tokens, FLAGS.rows, FLAGS.cols), FLAGS.rows,
                   FLAGS.cols)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="numlab-sass-")
    tokens = f"{FLAGS.tokens} token{'s' * (FLAGS.tokens != 1)}"
    result = {"what": f"{FLAGS.fmt} . {FLAGS.act}, {FLAGS.rows}x{FLAGS.cols}, {tokens}, compiled for "
                      f"sm_90 without a GPU (pip triton, enable_fp_fusion off; cuobjdump); the main loop is the "
                      f"largest backward branch", "jax_version": jax.__version__, "variants": []}
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("compiling for sm_90 needs pip's triton: pip install -e '.[sass]'")
    for i, text in enumerate(FLAGS.variant):
        try:
            cfg = qm.fit(dataclasses.replace(tuned, **sass.config_replacements(text)).check(), FLAGS.rows, FLAGS.cols)
        except ValueError as e:
            raise app.UsageError(f"--variant {text!r}: {e}") from None
        rows = compile_variant(cfg, os.path.join(workdir, str(i)))
        result["variants"].append({"variant": text or "tuned", "config": dataclasses.asdict(cfg), "kernels": rows})
        for r in rows:
            top = ", ".join(f"{op} {n}" for op, n in list(r["main_loop_opcodes"].items())[:8])
            per = r.get("warp_instructions_per_row_and_chunk")
            print(f"{text or 'tuned':32s} {r['kernel']:28s} regs {r['registers']:3d} stack {r['stack_bytes']:4d} "
                  f"conversions {r['layout_conversions']:2d} loop {r['main_loop_instructions_per_thread']:5d}"
                  + (f" ({per} per row and chunk)" if per else "")
                  + f": {top}")
    if FLAGS.out:
        atomic_write_json(FLAGS.out, result)
        print(f"wrote {FLAGS.out}; .ttir/.cubin/.sass under {workdir}")


if __name__ == "__main__":
    app.run(main)
