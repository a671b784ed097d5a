"""Benchmarks: `python scripts/bench.py codecs|model|attribute|matvec|moe [--out PATH ...]`, and
`python scripts/bench.py plot` (matvec.json and moe.json of one device run against ggml: vs_ggml.png).

Each subcommand is a function here running a module of numlab/bench and writing its JSON (plot: its PNG).
"""
import json

import xla_env  # noqa: F401  (before JAX starts)
import jax
from absl import app, flags, logging
from tqdm import tqdm

import numlab.formats as formats
from numlab.bench import codecs, matvec, model, moe, plot
from numlab.io import atomic_write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON output path (default results/bench/<subcommand>.json)")
flags.DEFINE_integer("repeats", 5, "timed repeats per measurement (median reported), after one warm-up")
flags.DEFINE_integer("seed", 0, "seed of the synthetic input")
flags.DEFINE_integer("rows", None, "codecs: rows of the input matrix (default 512 on CPU, 8192 on accelerators)")
flags.DEFINE_integer("cols", 4096, "codecs: columns of the input matrix (a multiple of 256)")
flags.DEFINE_string("size", "tiny", "model, attribute: synthetic model size (tiny, small, qwen3-30b-a3b)")
flags.DEFINE_integer("tokens", 64, "model, attribute: prompt length")
flags.DEFINE_list("policies", ["ggml-cpu", "f32"], "model: policies to run")
flags.DEFINE_list("formats", list(formats.QUANT_FORMATS), "codecs: formats to measure")
flags.DEFINE_string("low", "ggml-cpu", "attribute: policy under test")
flags.DEFINE_string("ref", "f32", "attribute: reference policy")
flags.DEFINE_integer("prompts", 4, "attribute: number of random prompts (of --tokens tokens)")
flags.DEFINE_integer("ig_points", 8, "attribute: integrated-gradients nodes")
flags.DEFINE_integer("batch_size", 0, "attribute: mix rows per compiled call (0: all at once)")
flags.DEFINE_list("inputs", ["results/bench/matvec.json", "results/bench/moe.json"],
                  "plot: benchmark results of one device run (the default --out: results/bench/vs_ggml.png)")


def bench_codecs() -> dict:
    rows = FLAGS.rows or (512 if jax.default_backend() == "cpu" else 8192)
    if rows <= 0 or FLAGS.cols <= 0 or FLAGS.cols % 256:
        raise app.UsageError(f"--rows {rows} and --cols {FLAGS.cols} must be positive, cols a multiple of 256")
    bad = [f for f in FLAGS.formats if f not in formats.QUANT_FORMATS]
    if bad:
        raise app.UsageError(f"--formats: unknown {bad}; valid: {', '.join(formats.QUANT_FORMATS)}")
    return codecs.run(rows, FLAGS.cols, FLAGS.formats, FLAGS.repeats, FLAGS.seed,
                      progress=lambda it: tqdm(it, desc="codecs", unit="format"))


def bench_model() -> dict:
    return model.run(FLAGS.size, FLAGS.tokens, FLAGS.policies, FLAGS.repeats, log=logging.info)


def bench_attribute() -> dict:
    if FLAGS.prompts < 1 or FLAGS.tokens < 2 or FLAGS.ig_points < 1 or FLAGS.batch_size < 0:
        raise app.UsageError(f"need --prompts >= 1, --tokens >= 2, --ig_points >= 1, --batch_size >= 0; got "
                             f"{FLAGS.prompts}, {FLAGS.tokens}, {FLAGS.ig_points}, {FLAGS.batch_size}")
    return model.run_attribution(FLAGS.size, FLAGS.prompts, FLAGS.tokens, FLAGS.low, FLAGS.ref, FLAGS.ig_points,
                                 FLAGS.batch_size or None, FLAGS.repeats, log=logging.info)


def _gpu_only(command: str):
    if jax.default_backend() != "gpu":
        raise app.UsageError(f"{command} times the Pallas GPU kernels against ggml's CUDA times; JAX's backend here "
                             f"is {jax.default_backend()!r} (without a GPU numlab.ops runs the XLA reference: "
                             f"`bench.py model` times it, `bench.py codecs` compares the codecs with ggml's C)")


def bench_matvec() -> dict:
    _gpu_only("matvec")
    return matvec.run(repeats=FLAGS.repeats, log=logging.info)


def bench_moe() -> dict:
    _gpu_only("moe")
    return moe.run(repeats=FLAGS.repeats, log=logging.info)


def bench_plot() -> None:
    results = []
    for path in FLAGS.inputs:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise app.UsageError(f"--inputs {path}: {e}") from None
    rows, untimed = plot.against_ggml(results)
    if untimed:
        logging.warning("left out, their routed path untimed: %s", "; ".join(untimed))
    if not rows:
        raise app.UsageError(f"--inputs {FLAGS.inputs}: no case with a ggml time (results/bench/peer.json)")
    out = FLAGS.out or "results/bench/vs_ggml.png"
    plot.plot_against_ggml(rows, out, plot.title(results))
    print(f"wrote {out}")


COMMANDS = {"codecs": bench_codecs, "model": bench_model, "attribute": bench_attribute, "matvec": bench_matvec,
            "moe": bench_moe, "plot": bench_plot}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one subcommand out of {', '.join(COMMANDS)}; got {argv[1:]}")
    if FLAGS.repeats < 1:
        raise app.UsageError(f"--repeats {FLAGS.repeats} must be >= 1")
    result = COMMANDS[argv[1]]()
    if result is None:
        return
    out = FLAGS.out or f"results/bench/{argv[1]}.json"
    atomic_write_json(out, result)
    logging.info("wrote %s", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
