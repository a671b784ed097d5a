"""Full-model benchmark: build a synthetic Qwen3-MoE on the device, run a prompt under policies."""
import time

import jax
import numpy as np

from numlab import policy as policy_lib
from numlab.bench.codecs import copy_bandwidth
from numlab.models import synthetic
from numlab.models.qwen3_moe import forward


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run(size: str, tokens: int, policies, repeats: int, log=print) -> dict:
    """Build `size`, then time forward(tokens) under each policy: first call (with compile) and later calls."""
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "size": size, "tokens": tokens,
              "copy_bandwidth_GBps": copy_bandwidth(1 << 30, 5) / 1e9, "runs": {}}
    t = time.perf_counter()
    model = synthetic.make_model(size)
    jax.block_until_ready(jax.tree.leaves(model.tensors))
    result["build_s"] = time.perf_counter() - t
    result["weight_bytes"] = int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(model.tensors)))
    result["peak_bytes_after_build"] = _peak_bytes()
    log(f"built {size} in {result['build_s']:.1f} s, {result['weight_bytes'] / 1e9:.2f} GB of weights")
    toks = (np.arange(tokens, dtype=np.int64) * 7919 % model.config.vocab).astype(np.int32)
    for name in policies:
        pol = policy_lib.get(name)
        t = time.perf_counter()
        trace = forward(model, toks, pol)
        jax.block_until_ready(trace.logits)
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(forward(model, toks, pol).logits)
            times.append(time.perf_counter() - t)
        logits = np.asarray(trace.logits, np.float64)
        result["runs"][name] = {"first_call_s": first, "median_s": float(np.median(times)),
                                "times_s": times, "peak_bytes": _peak_bytes(),
                                "logits_finite": bool(np.isfinite(logits).all()),
                                "next_token": int(logits[-1].argmax())}
        log(f"{name}: first {first:.1f} s, then {np.median(times):.3f} s")
    return result
