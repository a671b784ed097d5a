"""Run one sweep config: `python scripts/sweep.py --config=configs/sweeps/<name>.py[:<size>]`.

<size> is tiny (the default, CPU-sized) or qwen3-30b-a3b (the full model shape, for the GPU); config
fields can be overridden with --config.<field>=<value>. Writes <out>/<name>.json and <name>.png;
an interrupted run resumes from its finished chunks. All configs at once: scripts/cascade.py.
"""
import xla_env  # noqa: F401  (before JAX starts)
import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from numlab.analysis import sweeps

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "sweep config (configs/sweeps/<name>.py[:<size>])")
flags.DEFINE_string("out", "results/sweeps", "folder for <name>.json and <name>.png")
flags.DEFINE_bool("overwrite", False, "replace an existing result of the same name")
flags.DEFINE_bool("resume", True, "keep finished chunks under <out>/.chunks and reuse them on a rerun")
flags.mark_flag_as_required("config")


def progress(it, desc=None, total=None):
    """tqdm progress bar for the long loops of a sweep."""
    return tqdm(it, desc=desc, total=total, leave=False)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    jax.config.update("jax_enable_x64", True)
    cfg = _CONFIG.value
    try:
        result = sweeps.run_to_folder(cfg, FLAGS.out, overwrite=FLAGS.overwrite, resume=FLAGS.resume,
                                      progress=progress)
    except FileExistsError as e:
        raise app.UsageError(str(e)) from None
    logging.info("%s: %s", cfg.name, result["measured"])
    print(f"{cfg.name} ({result['wall_s']:.1f} s on {result['backend']}): {result['verdict']}\n"
          f"  {result['measured']}\n  wrote {FLAGS.out}/{cfg.name}.json and .png")


if __name__ == "__main__":
    app.run(main)
