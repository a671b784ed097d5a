"""Full-model benchmarks: build a synthetic Qwen3-MoE on the device, run a prompt under policies
(`run`), or time a whole attribution against one forward pass of the same prompts (`run_attribution`)."""
import time

import jax
import numpy as np

from numlab import kernels
from numlab import policy as policy_lib
from numlab.bench.codecs import copy_bandwidth
from numlab.analysis import attribution
from numlab.models import synthetic
from numlab.models.qwen3_moe import forward


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _build(size: str, result: dict, log):
    """The synthetic model of `size`, built on the device; build time, weight bytes and peak memory into result."""
    result.update({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "size": size, "copy_bandwidth_GBps": copy_bandwidth(1 << 30, 5) / 1e9,
                   "kernels": {"mode": kernels.mode(), "native": kernels.enabled()}})
    t = time.perf_counter()
    model = synthetic.make_model(size)
    jax.block_until_ready(jax.tree.leaves(model.tensors))
    result["build_s"] = time.perf_counter() - t
    result["weight_bytes"] = int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(model.tensors)))
    result["peak_bytes_after_build"] = _peak_bytes()
    log(f"built {size} in {result['build_s']:.1f} s, {result['weight_bytes'] / 1e9:.2f} GB of weights")
    return model


def _timed(fn, repeats: int):
    """(first call s, `repeats` later calls s, first result) of fn, which returns once its work is done."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, times, out


def run(size: str, tokens: int, policies, repeats: int, log=print) -> dict:
    """Build `size`, then time forward(tokens) under each policy: first call (with compile) and later calls."""
    result = {"tokens": tokens, "runs": {}}
    model = _build(size, result, log)
    toks = (np.arange(tokens, dtype=np.int64) * 7919 % model.config.vocab).astype(np.int32)
    for name in policies:
        pol = policy_lib.get(name)
        first, times, trace = _timed(lambda: jax.block_until_ready(forward(model, toks, pol)), repeats)  # noqa: B023
        logits = np.asarray(trace.logits, np.float64)
        result["runs"][name] = {"first_call_s": first, "median_s": float(np.median(times)),
                                "times_s": times, "peak_bytes": _peak_bytes(),
                                "logits_finite": bool(np.isfinite(logits).all()),
                                "next_token": int(logits[-1].argmax())}
        log(f"{name}: first {first:.1f} s, then {np.median(times):.3f} s")
    return result


def run_attribution(size: str, n_prompts: int, n_tokens: int, low: str, ref: str, ig_points: int,
                    batch_size, repeats: int, log=print) -> dict:
    """Time attribution.analyze(low vs ref) on n_prompts random prompts of n_tokens against one forward pass
    of the same prompts under `low` (vmapped over prompts); both after compilation, first calls reported too.
    Issue 7's target: the analysis within 20x of the forward pass."""
    result = {"n_prompts": n_prompts, "n_tokens": n_tokens, "low": low, "ref": ref, "ig_points": ig_points,
              "batch_size": batch_size}
    model = _build(size, result, log)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab, (n_prompts, n_tokens)).astype(np.int32)
    pol = policy_lib.get(low)
    prefill = jax.jit(jax.vmap(lambda m, t: forward(m, t, pol).logits, in_axes=(None, 0)))  # weights as arguments
    first, times, _ = _timed(lambda: jax.block_until_ready(prefill(model, tokens)), repeats)
    result["forward"] = {"first_call_s": first, "median_s": float(np.median(times)), "times_s": times}
    log(f"forward of {n_prompts} x {n_tokens} tokens under {low}: first {first:.1f} s, then {np.median(times):.3f} s")
    analyze = lambda: attribution.analyze(model, tokens, low, ref, ig_points=ig_points,  # noqa: E731
                                          batch_size=batch_size)                         # numpy: waited for
    first, times, _ = _timed(analyze, max(1, repeats // 5))
    median = float(np.median(times))
    result["attribution"] = {"first_call_s": first, "median_s": median, "times_s": times}
    result["attribution_over_forward"] = median / result["forward"]["median_s"]
    result["peak_bytes"] = _peak_bytes()
    log(f"attribution: first {first:.1f} s, then {median:.2f} s = {result['attribution_over_forward']:.1f}x the "
        f"forward pass (target <= 20x)")
    return result
