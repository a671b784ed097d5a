"""Write a synthetic Qwen3-MoE model (llama.cpp's Q4_K_M layout) as a GGUF file.

`python scripts/make_model.py --size tiny --out tiny.gguf [--seed 0]`; sizes: tiny, small,
qwen3-30b-a3b (generated and quantized on the default device, the GPU where there is one).
"""
import os
import time

import jax
from absl import app, flags, logging

from numlab.models import config, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "tiny", list(config.CONFIGS), "model size")
flags.DEFINE_integer("seed", 0, "seed of the synthetic weights")
flags.DEFINE_string("out", None, "GGUF file to write", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    synthetic.write(FLAGS.size, FLAGS.out, FLAGS.seed)
    logging.info("wrote %s (%s, seed %d, %.1f MB) in %.1f s on %s", FLAGS.out, FLAGS.size, FLAGS.seed,
                 os.path.getsize(FLAGS.out) / 1e6, time.perf_counter() - start, jax.default_backend())


if __name__ == "__main__":
    app.run(main)
