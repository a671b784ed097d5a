"""The MoE layer's products on the device: issue 7's MUL_MAT_ID (one expert projection, 128 experts,
8 used per token, Qwen3-30B-A3B's 768 x 2048) through the grouped kernel against the plain-XLA
reference (numlab.ops.qmatvec on the gathered experts) and ggml, then the whole moe_ffn layer.

Each call routes its tokens to fresh random experts (8 distinct per token), so the weights read
change between calls; timing, checking and figures as numlab.bench.matvec.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from numlab.bench import matvec as mv
from numlab.formats import QTensor
from numlab.kernels import moe
from numlab.kernels import qmatmul as qm
from numlab.ops import qmatvec as ops_qmatvec

N_EXPERTS, TOP_K, D_FF, D_MODEL = 128, 8, 768, 2048


def tokens_per_expert(n: int) -> int:
    """Mean tokens per expert of n tokens routed to TOP_K of N_EXPERTS (at least 1): the token count
    numlab.ops.expert_qmatvec routes by (kernels.use_for)."""
    return max(1, n * TOP_K // N_EXPERTS)


def routes(key, n: int, n_experts: int, k: int = TOP_K):
    """int32 [n, k]: k distinct random experts out of n_experts per token."""
    keys = jax.random.split(key, n)
    return jax.vmap(lambda kk: jax.random.permutation(kk, n_experts)[:k])(keys).astype(jnp.int32)


def grouped_product(case: mv.Case, cfg: qm.Config):
    """jit (w stack [E, rows, cols], x [n, cols], idx [n, k]) -> y [n, k, rows] via the grouped kernel."""
    interpret = jax.default_backend() == "cpu"
    cfg = qm.fit(cfg, case.rows, case.cols)

    def product(w, x, idx):
        y = moe.expert_qmatvec_fast(w, x, idx.reshape(-1), case.act, config=cfg, interpret=interpret)
        return y.reshape(idx.shape + (case.rows,))
    return jax.jit(product)


@functools.lru_cache(maxsize=None)
def reference_product(case: mv.Case):
    """jit (w stack, x, idx) -> y through numlab.ops.qmatvec on the gathered experts' bytes."""
    return jax.jit(lambda w, x, idx: ops_qmatvec(QTensor(w.data[idx], w.fmt, w.shape), x[:, None, :], case.act, "f32",
                                                         impl="reference"))


CHECK_TOKENS = 16       # the check compares the first tokens only (the reference gathers whole experts)
REFERENCE_MAX_N = 64    # the plain-XLA reference is timed up to this many tokens (its gathered weights grow with n)


def ffn_product(act: str):
    """jit (gate, up, down, x, idx, weights) -> moe_ffn in the tuned configs."""
    interpret = jax.default_backend() == "cpu"
    return jax.jit(lambda g, u, d, x, idx, w: moe.moe_ffn(x, idx, w, g, u, d, act, interpret=interpret))


def measure(case: mv.Case, fn, w: QTensor, xs, idxs, calls: int, repeats: int, copy_bw: float,
            check: bool, touched: float) -> dict:
    """Check against the reference (optional) and time fn; figures count the touched experts' bytes
    and 2·rows·cols·n·TOP_K flops (as ggml's MUL_MAT_ID)."""
    entry = {}
    try:
        t0 = time.perf_counter()
        y = jax.block_until_ready(fn(w, xs[0], idxs[0]))
        entry["compile_and_first_s"] = time.perf_counter() - t0
        if check:
            x, idx = xs[0][:CHECK_TOKENS], idxs[0][:CHECK_TOKENS]
            ref = reference_product(case)(w, x, idx)
            deq = mv.dequantizer(w.fmt)(w.data[idx])
            entry["max_err_over_scale"] = mv._rel_err(y[:CHECK_TOKENS], ref, deq,
                                                      jnp.broadcast_to(x[:, None], deq.shape[:2] + (case.cols,)))
            entry["ok"] = bool(entry["max_err_over_scale"] <= mv.CHECK_RTOL)
        args = [(w, xs[i % len(xs)], idxs[i]) for i in range(len(idxs))]
        moved = touched * case.weight_bytes + 4 * case.n * (case.cols + TOP_K * case.rows)
        entry["cold"] = mv.figures(case, mv.time_calls(fn, args, calls, repeats), copy_bw, moved,
                                   2 * case.rows * case.cols * case.n * TOP_K)
    except Exception as e:  # recorded, the run goes on
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        entry["ok"] = False
    return entry


class Sweep(mv.Sweep):
    """MUL_MAT_ID: reference and grouped-kernel variants for n tokens, each routed to TOP_K of
    N_EXPERTS experts (fresh routes per call)."""

    def __init__(self, case: mv.Case, configs, key, repeats: int, copy_bw: float, log=print):
        self.case, self.configs, self.repeats, self.copy_bw, self.log = case, list(configs), repeats, copy_bw, log
        self.calls = 8 if case.n >= 64 else 32
        kw, kx, ki = jax.random.split(key, 3)
        (self.w,) = mv.random_weights(kw, case.fmt, 1, case.rows, case.cols, stack=(N_EXPERTS,))
        self.xs = [jax.random.normal(jax.random.fold_in(kx, i), (case.n, case.cols), jnp.float32) for i in range(4)]
        self.idxs = [routes(jax.random.fold_in(ki, i), case.n, N_EXPERTS) for i in range(self.calls)]
        self.touched = float(np.mean([len(np.unique(np.asarray(i))) for i in self.idxs]))
        self.out = {"case": dataclasses.asdict(case), "experts": N_EXPERTS, "top_k": TOP_K,
                    "mean_experts_touched": self.touched, "reference": None, "variants": []}

    def _measure(self, fn, check):
        return measure(self.case, fn, self.w, self.xs, self.idxs, self.calls, self.repeats, self.copy_bw, check,
                       self.touched)

    def reference(self):
        if self.case.n <= REFERENCE_MAX_N:
            self.out["reference"] = self._measure(reference_product(self.case), False)
            self.log(f"{self.case.name}: reference {mv._brief(self.out['reference'])}")

    def variant(self, i: int):
        cfg = self.configs[i]
        e = self._measure(grouped_product(self.case, cfg), True)
        e["config"] = mv.config_dict(cfg)
        self.out["variants"].append(e)
        self.log(f"{self.case.name}: {cfg} -> {mv._brief(e)}")


def ffn_sweep(n: int, act: str, key, repeats: int, deadline: float, log=print) -> dict:
    """The whole layer (gate, up: q4_k; down: q6_k, as Q4_K_M's ffn_down_exps) for n tokens, each
    projection in numlab.kernels.tuning's config for it."""
    out = {"n": n, "act": act, "config": "tuned"}
    if time.perf_counter() > deadline:
        out["skipped_for_time"] = True
        return out
    try:
        kg, ku, kd, kx, ki = jax.random.split(key, 5)
        (gate,) = mv.random_weights(kg, "q4_k", 1, D_FF, D_MODEL, stack=(N_EXPERTS,))
        (up,) = mv.random_weights(ku, "q4_k", 1, D_FF, D_MODEL, stack=(N_EXPERTS,))
        (down,) = mv.random_weights(kd, "q6_k", 1, D_MODEL, D_FF, stack=(N_EXPERTS,))
        x = jax.random.normal(kx, (n, D_MODEL), jnp.float32)
        wts = jnp.full((n, TOP_K), 1.0 / TOP_K, jnp.float32)
        args = [(gate, up, down, x, routes(jax.random.fold_in(ki, i), n, N_EXPERTS), wts) for i in range(8)]
        t = mv.time_calls(ffn_product(act), args, 8, repeats)
        out.update({"device_us": t["device_s"] and t["device_s"] * 1e6, "wall_us": t["wall_s"] * 1e6})
    except Exception as e:  # recorded, the run goes on
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    log(f"moe_ffn n={n} act={act}: {out.get('device_us', out.get('error'))}")
    return out


def default_cases():
    """(case, configs): the MUL_MAT_ID rows of issue 7 and the Q6_K ffn_down of Qwen3-30B-A3B's Q4_K_M
    (768 columns: odd super-blocks per row), each led by the tuned config (matvec.tuned_first)."""
    one = [mv.tiling(16, ksplit=4, prefetch=True), mv.tiling(16, ksplit=2, unroll=2, prefetch=True),
           mv.tiling(16, ksplit=4), mv.tiling(32, ksplit=2, warps=8)]
    few_int = [mv.tiling(32, tokens=4, ksplit=4), mv.tiling(32, tokens=4, ksplit=2), mv.tiling(32, tokens=8, ksplit=2),
               mv.tiling(64, tokens=16), mv.tiling(16, tokens=4, ksplit=4)]
    many_int = [mv.tiling(64, tokens=16, prefetch=True), mv.tiling(64, tokens=32),
                mv.tiling(64, tokens=32, prefetch=True), mv.tiling(128, tokens=16, warps=8)]
    few_float = [mv.tiling(32, tokens=4, warps=8), mv.tiling(32, tokens=8, warps=8)]
    many_float = [mv.tiling(64, tokens=16, warps=8), mv.tiling(32, tokens=8, warps=8)]
    q4 = lambda n, act: mv.Case("q4_k", D_FF, D_MODEL, n, act, "mul_mat_id")
    cases = [(q4(1, "q8_1"), one), (q4(64, "q8_1"), few_int), (q4(256, "q8_1"), many_int),
             (mv.Case("q6_k", D_FF, D_MODEL, 1, "q8_1", "mul_mat_id"), one[:2]),
             (mv.Case("q6_k", D_MODEL, D_FF, 1, "q8_1", "mul_mat_id"), one[:2]),     # Q4_K_M's Q6_K ffn_down
             (q4(1, "f32"), one[:2]), (q4(64, "f32"), few_float), (q4(256, "f32"), many_float)]
    return [(c, mv.tuned_first(c, cfgs, tokens_per_expert(c.n), min(c.n * TOP_K, N_EXPERTS)))
            for c, cfgs in cases]


def run(cases=None, repeats: int = 10, budget_s: float = 90.0, seed: int = 0, copy_bw: float | None = None,
        log=print) -> dict:
    """MUL_MAT_ID cases (reference and first variant each, then more variants), then the whole layer."""
    from numlab.bench.codecs import copy_bandwidth
    start = time.perf_counter()
    dev = jax.devices()[0]
    copy_bw = copy_bw or copy_bandwidth(1 << 30, repeats)
    sweeps = [Sweep(c, cfgs, jax.random.PRNGKey(seed * 1000 + i), repeats, copy_bw, log)
              for i, (c, cfgs) in enumerate(cases or default_cases())]
    results = mv.run_sweeps(sweeps, start + 0.8 * budget_s)
    ffn = [ffn_sweep(n, "q8_1", jax.random.PRNGKey(seed * 1000 + 500 + n), repeats, start + budget_s - 15, log)
           for n in (1, 64, 256)] if cases is None else []
    return {"device": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
            "copy_bandwidth_bytes_per_s": copy_bw, "repeats": repeats, "check_rtol": mv.CHECK_RTOL,
            "notes": __doc__ + " Bandwidth figures count the bytes of the experts a call touches and "
                     "2·rows·cols·n·top_k flops (as ggml's MUL_MAT_ID figures).",
            "elapsed_s": time.perf_counter() - start, "cases": results, "moe_ffn": ffn}
