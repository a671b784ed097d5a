"""Quantized matvec / matmul on the device: numlab's Pallas kernels against the plain-XLA reference
(numlab.ops.qmatvec) and ggml's CUDA figures, for the shapes of issue 7.

Every kernel variant is first checked against the reference on fresh random inputs (weights of
random block bytes with finite scales); a variant that fails to compile or to agree is recorded with
its error and skipped. Times: `calls` jitted products dispatched back to back, each on other
activations and on weights rotated over copies that together exceed the L2 cache ("cold"), or on
one copy ("hot", as ggml's perf loop re-runs one tensor). Reported per product: device time (the sum
of the GPU kernels' durations in a profiler trace, activation quantization included) and wall time
(host clock over all calls). Bandwidth counts the packed weights, activations and outputs once;
rates are 2·m·k·n flops per second.
"""
import dataclasses
import functools
import glob
import math
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

import numlab.formats as formats
from numlab.bench import peer
from numlab.formats import QTensor
from numlab.kernels import qmatmul as qm
from numlab.ops import qmatvec as ops_qmatvec

L2_BYTES = 50 << 20        # H100 L2
ROTATE_BYTES = 3 * L2_BYTES
CHECK_RTOL = 1e-5          # |ours - ref| <= CHECK_RTOL * (|W| |x|)
MEMORY_BOUND = 8           # activation rows up to which a matvec sweep measures the read ceiling (read_rate)
GGML_US = {                # issue 7's table: ggml CUDA test-backend-ops perf on the lent H100, microseconds
    ("mul_mat", "q4_k", 4096, 14336, 1): 18.1,
    ("mul_mat", "q6_k", 4096, 14336, 1): 30.5,
    ("mul_mat", "q8_0", 4096, 14336, 1): 27.4,
    ("mul_mat", "q4_k", 4096, 14336, 8): 70.4,
    ("mul_mat", "q4_k", 4096, 14336, 512): 343.0,
    ("mul_mat_id", "q4_k", 768, 2048, 1): 8.1,
    ("mul_mat_id", "q4_k", 768, 2048, 64): 197.0,
    ("mul_mat_id", "q4_k", 768, 2048, 256): 313.0,
    ("mul_mat_id", "q6_k", 768, 2048, 1): 10.7,
}
_F16_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q8_0": (0,)}


def ggml_source() -> str:
    """Where ggml's times come from: results/bench/peer.json (scripts/device_peer.sh) where it exists,
    else issue 7's table."""
    return peer.PEER_JSON if peer.load() else "issue 7 table (ggml CUDA test-backend-ops perf, H100)"


def ggml_time_us(case) -> float | None:
    """ggml CUDA's microseconds for the case's shape and weight format (ggml_source's figures)."""
    return (peer.load() or GGML_US).get((case.what, case.fmt, case.rows, case.cols, case.n))


@dataclasses.dataclass(frozen=True)
class Case:
    """A product of a [rows, cols] matrix in fmt with n activation rows in mode act."""

    fmt: str
    rows: int
    cols: int
    n: int
    act: str
    what: str = "mul_mat"

    @property
    def name(self) -> str:
        return f"{self.what} {self.fmt} m={self.rows} k={self.cols} n={self.n} act={self.act}"

    @property
    def weight_bytes(self) -> int:
        return self.rows * formats.row_bytes(self.fmt, self.cols)


def random_weights(key, fmt: str, copies: int, rows: int, cols: int, stack: tuple = ()) -> list:
    """`copies` QTensors of shape [*stack, rows, cols] of uniformly random block bytes, made on the
    device, their fp16 scale fields set to random finite values in [1e-3, 1e-2)."""
    spec = formats.spec(fmt)
    nb = cols // spec.block_size

    @jax.jit
    def one(k):
        k1, k2 = jax.random.split(k)
        raw = jax.random.bits(k1, (*stack, rows, nb, spec.type_size), jnp.uint8)
        for i, off in enumerate(_F16_FIELDS[fmt]):
            half = jax.random.uniform(jax.random.fold_in(k2, i), raw.shape[:-1], jnp.float32, 1e-3, 1e-2)
            raw = raw.at[..., off:off + 2].set(jax.lax.bitcast_convert_type(half.astype(jnp.float16), jnp.uint8))
        return raw.reshape(*stack, rows, nb * spec.type_size)

    return [QTensor(one(jax.random.fold_in(key, c)), fmt, (rows, cols)) for c in range(copies)]


def copies_for(nbytes: int, calls: int) -> int:
    """Weight copies to rotate over so that consecutive calls miss the L2 cache (at most `calls`)."""
    return max(1, min(calls, math.ceil(ROTATE_BYTES / nbytes)))


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "Framework Ops", "Framework Name Scope",
                  "Launch Stats", "Kernel Stats", "TensorFlow Name Scope", "TensorFlow Ops")


def _device_busy(xspace_dir: str) -> tuple[float | None, list, dict]:
    """(sum of GPU activity durations in ns in the trace under xspace_dir (CUPTI stream lines), the
    names of the lines summed, ns per activity name); None where the trace has no GPU plane."""
    files = glob.glob(f"{xspace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return None, [], {}
    total, names, by_name = 0.0, [], {}
    for plane in ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or \
                [ln for ln in plane.lines if ln.name not in _DERIVED_LINES]
        for ln in lines:
            names.append(ln.name)
            for e in ln.events:
                total += e.duration_ns
                by_name[e.name] = by_name.get(e.name, 0.0) + e.duration_ns
    return (total if names else None), names, by_name


def time_calls(fn, arg_sets, calls: int, repeats: int) -> dict:
    """Per-call device and wall seconds of fn over `calls` calls cycling through arg_sets, after a
    warm-up: wall = median over `repeats` rounds; device = kernel time in one traced round."""
    jax.block_until_ready([fn(*a) for a in arg_sets])
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)])
        walls.append((time.perf_counter() - t0) / calls)
    out = {"wall_s": statistics.median(walls), "wall_best_s": min(walls)}
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                jax.block_until_ready([fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)])
            busy, names, by_name = _device_busy(d)
        out["device_s"] = None if busy is None else busy * 1e-9 / calls
        out["trace_lines"] = names[:8]
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
        out["kernels_us_per_call"] = {k[:120]: v * 1e-3 / calls for k, v in top}
    except Exception as e:  # no profiler on this machine: wall times only
        out["device_s"], out["trace_error"] = None, f"{type(e).__name__}: {e}"[:500]
    return out


def _rel_err(y, ref, w_deq, x) -> float:
    """max |y - ref| / (|W| |x|) over outputs (NaN or Inf in y: inf)."""
    scale = jnp.einsum("...rc,...c->...r", jnp.abs(w_deq), jnp.abs(x.astype(jnp.float32)),
                       precision=jax.lax.Precision.HIGHEST)
    err = jnp.abs(y - ref) / jnp.maximum(scale, 1e-30)
    return float(jnp.where(jnp.all(jnp.isfinite(y)), jnp.max(err), jnp.inf))


@functools.lru_cache(maxsize=None)
def read_rate(nbytes: int, rows: int, calls: int, repeats: int) -> float:
    """Bytes/s that XLA's int32 row sum reads from [rows, nbytes / 4 / rows] arrays rotated past the L2
    (copies_for), from device time where there is one: a read-only ceiling for a matvec whose packed
    weights take nbytes (at 64 MB on the H100 1.26 of the copy bandwidth, results/bench/read-ceiling-h100.json);
    measured once per process and shape (the sweeps of one weight size share it)."""
    words = max(1, nbytes // 4 // rows)
    arrays = [jnp.full((rows, words), i, jnp.int32) for i in range(copies_for(nbytes, calls))]
    t = time_calls(jax.jit(lambda a: jnp.sum(a, axis=1)), [(a,) for a in arrays], calls, repeats)
    return 4 * rows * words / (t["device_s"] or t["wall_s"])


def figures(case: Case, t: dict, copy_bw: float, moved: float | None = None, flops: float | None = None,
            read_bw: float | None = None) -> dict:
    """Device and wall time per product, bandwidth and rate (from device time where there is one),
    their ratios to the copy bandwidth and to ggml; with read_bw (read_rate's) the packed weights' read
    rate as a fraction of it. moved, flops: default one [rows, cols] matrix's packed bytes plus float32
    activations and outputs, and 2·rows·cols·n."""
    seconds = t["device_s"] or t["wall_s"]
    moved = moved or case.weight_bytes + 4 * case.n * (case.cols + case.rows)
    flops = flops or 2 * case.rows * case.cols * case.n
    ggml_us = ggml_time_us(case)
    return {"device_us": None if t["device_s"] is None else t["device_s"] * 1e6, "wall_us": t["wall_s"] * 1e6,
            "wall_best_us": t["wall_best_s"] * 1e6, "gb_per_s": moved / seconds / 1e9,
            "of_copy_bandwidth": moved / seconds / copy_bw,
            "tflop_per_s": flops / seconds / 1e12,
            "ggml_us": ggml_us, "ggml_over_ours": None if ggml_us is None else ggml_us * 1e-6 / seconds,
            "weights_of_read_rate": None if read_bw is None else case.weight_bytes / seconds / read_bw,
            **{k: t[k] for k in ("trace_lines", "trace_error", "kernels_us_per_call") if k in t}}


def kernel_product(case: Case, cfg: qm.Config):
    """jit (w QTensor [rows, cols], x [n, cols]) -> y: activation preparation and the kernel."""
    interpret = jax.default_backend() == "cpu"

    cfg = qm.fit(cfg, case.rows, case.cols)

    def product(w, x):
        n_tiles = -(-case.n // cfg.tokens)
        xp = jnp.pad(x, ((0, n_tiles * cfg.tokens - case.n), (0, 0)))
        y = qm.qmatmul(w.data[None], w.fmt, w.shape, xp, jnp.zeros((n_tiles,), jnp.int32),
                       case.act, cfg, interpret)
        return y[:case.n]
    return jax.jit(product)


@functools.lru_cache(maxsize=None)
def reference_product(case: Case):
    """jit (w, x) -> y through numlab.ops.qmatvec: the plain-XLA path (one per case)."""
    return jax.jit(lambda w, x: ops_qmatvec(w, x, case.act, "f32", impl="reference"))


@functools.lru_cache(maxsize=None)
def dequantizer(fmt: str):
    """jit data -> float32 weights in fmt."""
    return jax.jit(lambda d: formats.dequantize(d, fmt))


def measure(case: Case, fn, ws: list, xs: list, calls: int, repeats: int, copy_bw: float,
            check: bool = True, hot: bool = False, read_bw: float | None = None) -> dict:
    """Check against the reference (optional) and time fn (figures); errors are recorded, not raised."""
    entry = {}
    try:
        t0 = time.perf_counter()
        y = jax.block_until_ready(fn(ws[0], xs[0]))
        entry["compile_and_first_s"] = time.perf_counter() - t0
        if check:
            ref = reference_product(case)(ws[0], xs[0])
            w_deq = dequantizer(case.fmt)(ws[0].data)
            entry["max_err_over_scale"] = _rel_err(y, ref, w_deq, xs[0])
            entry["ok"] = bool(entry["max_err_over_scale"] <= CHECK_RTOL)
        cold = [(ws[i % len(ws)], xs[i % len(xs)]) for i in range(max(len(ws), len(xs)))]
        entry["cold"] = figures(case, time_calls(fn, cold, calls, repeats), copy_bw, read_bw=read_bw)
        if hot:
            entry["hot"] = figures(case, time_calls(fn, [(ws[0], x) for x in xs], calls, repeats), copy_bw,
                                   read_bw=read_bw)
    except Exception as e:  # a kernel that fails to compile or run is a result, not the end of the run
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        entry["traceback"] = traceback.format_exc()[-4000:]
        entry["ok"] = False
    return entry


def config_dict(cfg: qm.Config) -> dict:
    return dataclasses.asdict(cfg)


def cold_us(entry: dict) -> float:
    """A timing's cold-weight microseconds: device time where the profiler gave one, else wall time."""
    c = entry["cold"]
    return c["device_us"] if c["device_us"] is not None else c["wall_us"]


def cold_us_or_nan(entry: dict | None) -> float:
    """cold_us of a timing that ran and passed its check; nan for none, an error or a failed check."""
    return cold_us(entry) if entry and "cold" in entry and entry.get("ok", True) else float("nan")


class Sweep:
    """One case's inputs, its reference timing and its kernel variants, measured one at a time."""

    def __init__(self, case: Case, configs, key, repeats: int, copy_bw: float, log=print):
        self.case, self.configs, self.repeats, self.copy_bw, self.log = case, list(configs), repeats, copy_bw, log
        self.calls = 8 if case.n >= 256 or case.weight_bytes > (200 << 20) else 32
        copies = copies_for(case.weight_bytes, self.calls)
        kw, kx = jax.random.split(key)
        self.ws = random_weights(kw, case.fmt, copies, case.rows, case.cols)
        self.xs = [jax.random.normal(jax.random.fold_in(kx, i), (case.n, case.cols), jnp.float32) for i in range(8)]
        self.read_bw = read_rate(case.weight_bytes, case.rows, self.calls, repeats) if case.n <= MEMORY_BOUND else None
        self.out = {"case": dataclasses.asdict(case), "weight_bytes": case.weight_bytes, "copies": copies,
                    "calls_per_timing": self.calls, "read_rate_bytes_per_s": self.read_bw,
                    "read_rate_of_copy_bandwidth": None if self.read_bw is None else self.read_bw / copy_bw,
                    "reference": None, "variants": []}

    def reference(self):
        self.out["reference"] = measure(self.case, reference_product(self.case), self.ws, self.xs, self.calls,
                                        self.repeats, self.copy_bw, check=False, read_bw=self.read_bw)
        self.log(f"{self.case.name}: reference {_brief(self.out['reference'])}")

    def variant(self, i: int):
        cfg = self.configs[i]
        e = measure(self.case, kernel_product(self.case, cfg), self.ws, self.xs, self.calls, self.repeats,
                    self.copy_bw, hot=(i == 0 and self.case.n == 1), read_bw=self.read_bw)
        e["config"] = config_dict(cfg)
        self.out["variants"].append(e)
        self.log(f"{self.case.name}: {cfg} -> {_brief(e)}")

    def result(self) -> dict:
        return finish(self.out, [config_dict(c) for c in self.configs])


def finish(out: dict, configs: list) -> dict:
    """out with the best correct variant, its speed-up over the reference, configs never run."""
    done = [v["config"] for v in out["variants"]]
    out["skipped_for_time"] = [c for c in configs if c not in done]
    good = [v for v in out["variants"] if v.get("ok") and "cold" in v]
    out["best"] = min(good, key=cold_us) if good else None
    if out["best"] and out["reference"] and "cold" in out["reference"]:
        out["best_speedup_over_reference"] = cold_us(out["reference"]) / cold_us(out["best"])
    return out


def run_sweeps(sweeps: list, deadline: float) -> list:
    """Every sweep's reference and first variant, then the other variants round-robin until the
    deadline, so that a short run still covers every case."""
    for sw in sweeps:
        if time.perf_counter() < deadline:
            sw.reference()
        if time.perf_counter() < deadline and sw.configs:
            sw.variant(0)
    for i in range(1, max((len(sw.configs) for sw in sweeps), default=0)):
        for sw in sweeps:
            if i < len(sw.configs) and time.perf_counter() < deadline:
                sw.variant(i)
    return [sw.result() for sw in sweeps]


def _brief(e: dict) -> str:
    if "cold" not in e:
        return f"ERROR {e.get('error', '?')[:300]}"
    c = e["cold"]
    dev = "n/a" if c["device_us"] is None else f"{c['device_us']:.1f}"
    ggml = "" if c["ggml_over_ours"] is None else f", ggml/ours {c['ggml_over_ours']:.2f}"
    check = "" if "ok" not in e else f", ok={e['ok']} err={e['max_err_over_scale']:.2g}"
    read = "" if c.get("weights_of_read_rate") is None else f", weights at {c['weights_of_read_rate']:.2f} of read"
    return (f"device {dev} us, wall {c['wall_us']:.1f} us, {c['gb_per_s']:.0f} GB/s "
            f"({c['of_copy_bandwidth']:.2f} of copy{read}), {c['tflop_per_s']:.2f} TFLOP/s{ggml}{check}")


def tiling(rows, tokens=1, ksplit=1, unroll=1, warps=4, stages=3, dot="f32", lane_runs=0, words=True,
           prefetch=False, atomic=False):
    """A qmatmul.Config under the bench's short names (warps, stages)."""
    return qm.Config(rows=rows, tokens=tokens, ksplit=ksplit, unroll=unroll, num_warps=warps,
                     num_stages=stages, dot=dot, lane_runs=lane_runs, words=words, prefetch=prefetch, atomic=atomic)


# Variants, the expected best first (a run out of time keeps the first ones).
ONE_TOKEN = [tiling(16, unroll=4, prefetch=True), tiling(16, ksplit=2, unroll=2, prefetch=True),
             tiling(16, ksplit=4, prefetch=True), tiling(16, ksplit=8, prefetch=True), tiling(16, ksplit=4),
             tiling(32, ksplit=8), tiling(16, ksplit=8), tiling(32, ksplit=4), tiling(16, ksplit=4, unroll=2),
             tiling(8, ksplit=4), tiling(16, ksplit=4, warps=2), tiling(64, ksplit=8),
             tiling(32, ksplit=4, warps=8), tiling(16, ksplit=8, words=False), tiling(32, ksplit=8, stages=1)]
FEW_TOKENS_INT = [tiling(64, tokens=16, ksplit=8, prefetch=True), tiling(32, tokens=8, ksplit=8),
                  tiling(32, tokens=8, ksplit=4), tiling(64, tokens=16, ksplit=4),
                  tiling(16, tokens=8, ksplit=8, warps=2), tiling(64, tokens=16, ksplit=2)]
FEW_TOKENS_FLOAT = [tiling(32, tokens=8, ksplit=4, warps=8), tiling(32, tokens=8, ksplit=8, warps=8),
                    tiling(16, tokens=8, ksplit=4, warps=4), tiling(32, tokens=16, ksplit=4, warps=4)]
MANY_TOKENS_INT = [tiling(64, tokens=64, ksplit=2, prefetch=True), tiling(64, tokens=64, warps=4),
                   tiling(128, tokens=64, warps=8), tiling(64, tokens=32, warps=4)]
MANY_TOKENS_FLOAT = [tiling(64, tokens=32, warps=8), tiling(32, tokens=16, warps=4),
                     tiling(64, tokens=32, warps=8, dot="tf32x3"), tiling(64, tokens=16, warps=4, dot="tf32x3")]


def tuned_first(case: Case, configs, tokens_per_matrix: int | None = None, matrices: int = 1) -> list:
    """numlab.kernels.tuning's config for the case (what the model runs) first; below 16 tokens in an integer mode on
    the word formats also it with sums per word (lane_sums, at 16 and 32 rows), on bytes (words=False), for one
    token with prefetch flipped, with the split sum after the kernel where it adds atomically, and q8_k with x
    quantized by XLA; one float token also on words (float_words: 16 rows a chunk ahead, 32 rows, 16 rows in 2
    splits two ahead); dot tiles that can read words (qmatmul.dot_words) also with words flipped; then configs
    (tokens_per_matrix, matrices: the tuning's token count, default case.n, and matrices per launch)."""
    from numlab.kernels import tuning
    tuned = tuning.config_for(case.fmt, case.act, tokens_per_matrix or case.n, case.rows, case.cols, matrices)
    out = [tuned]
    if qm.uses_words(case.fmt, case.act, tuned, case.cols):
        out += [dataclasses.replace(tuned, lane_sums=True, rows=r) for r in (16, 32)]
        out.append(dataclasses.replace(tuned, words=False, prefetch=False))
        if tuned.tokens == 1:
            out.append(dataclasses.replace(tuned, prefetch=not tuned.prefetch))
        if tuned.atomic:
            out.append(dataclasses.replace(tuned, atomic=False))
        if case.act == "q8_k":
            out.append(dataclasses.replace(tuned, x_kernel=False))
    if qm.float_words(case.fmt, case.act, dataclasses.replace(tuned, float_words=True), case.cols):
        out += [dataclasses.replace(tuned, float_words=True, rows=16, prefetch=True),
                dataclasses.replace(tuned, float_words=True, rows=32),
                dataclasses.replace(tuned, float_words=True, rows=16, ksplit=2, unroll=2, prefetch=True, atomic=True)]
    flipped = dataclasses.replace(tuned, words=not tuned.words)
    if qm.dot_words(case.fmt, case.act, tuned) or qm.dot_words(case.fmt, case.act, flipped):
        out.append(flipped)
    return out + [c for c in configs if c not in out]


def default_cases():
    """(case, configs) in priority order: issue 7's MUL_MAT rows, then attention and lm_head shapes,
    then q5_k at one token, each led by the tuned config (tuned_first)."""
    big = (4096, 14336)
    cases = [(Case("q4_k", *big, 1, act), ONE_TOKEN) for act in ("q8_1", "f32")]
    cases.append((Case("q4_k", *big, 1, "q8_k"), ONE_TOKEN[:3]))
    two_byte = ONE_TOKEN[:4] + [tiling(32, ksplit=4, lane_runs=1), tiling(64, ksplit=4)]
    cases += [(Case(fmt, *big, 1, act), two_byte) for fmt in ("q6_k", "q8_0") for act in ("q8_1", "f32")]
    cases += [(Case(fmt, *big, 4, "q8_1"), []) for fmt in ("q4_k", "q8_0")]
    cases += [(Case("q4_k", *big, 8, "q8_1"), FEW_TOKENS_INT), (Case("q4_k", *big, 8, "f32"), FEW_TOKENS_FLOAT),
              (Case("q4_k", *big, 512, "q8_1"), MANY_TOKENS_INT), (Case("q4_k", *big, 512, "f32"), MANY_TOKENS_FLOAT)]
    cases += [(Case("q4_k", 4096, 2048, 1, act), ONE_TOKEN[:4]) for act in ("q8_1", "f32")]
    cases += [(Case(fmt, 512, 2048, 1, "q8_1"), ONE_TOKEN[:4]) for fmt in ("q4_k", "q6_k")]
    cases += [(Case("q6_k", 151936, 2048, 1, act), [tiling(16, prefetch=True)] + ONE_TOKEN[:2])
              for act in ("q8_1", "f32")]
    cases.append((Case("q5_k", *big, 1, "q8_1"), []))
    return [(case, tuned_first(case, configs)) for case, configs in cases]


def run(cases=None, repeats: int = 10, budget_s: float = 240.0, seed: int = 0, copy_bw: float | None = None,
        log=print) -> dict:
    """Every case (reference and first variant, then more variants) until budget_s is spent; the
    device, versions and copy bandwidth."""
    from numlab.bench.codecs import copy_bandwidth
    start = time.perf_counter()
    dev = jax.devices()[0]
    copy_bw = copy_bw or copy_bandwidth(1 << 30, repeats)
    log(f"device {dev.device_kind}, jax {jax.__version__}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    sweeps = [Sweep(case, configs, jax.random.PRNGKey(seed * 1000 + i), repeats, copy_bw, log)
              for i, (case, configs) in enumerate(cases or default_cases())]
    results = run_sweeps(sweeps, start + budget_s)
    return {"device": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
            "copy_bandwidth_bytes_per_s": copy_bw, "repeats": repeats, "check_rtol": CHECK_RTOL,
            "ggml_source": ggml_source(),
            "notes": __doc__, "elapsed_s": time.perf_counter() - start, "cases": results}


def quantize_x_sweep(cols_list=(14336, 2048), pers=(64, 32, 16, 8, 4, 2, 1), calls: int = 200, repeats: int = 5,
                     log=print) -> list:
    """Device time of quantize_x.q8_blocks on one row of each width in cols_list, `per` groups of 32 per
    program, codes as words (the one-token kernels' form), and whether each per gives the same bits as
    the first: [{cols, per, device_us, wall_us, same, kernels_us_per_call}]."""
    from numlab.kernels import quantize_x
    out = []
    for cols in cols_list:
        xs = [(jax.random.normal(jax.random.PRNGKey(i), (1, cols), jnp.float32),) for i in range(4)]
        first = None
        for per in pers:
            if (cols // quantize_x.GROUP) % per:
                continue
            fn = jax.jit(functools.partial(quantize_x.q8_blocks, codes="words", per=per))
            y = list(fn(*xs[0]))
            first = first or y
            t = time_calls(fn, xs, calls, repeats)
            entry = {"cols": cols, "per": per, "device_us": None if t["device_s"] is None else t["device_s"] * 1e6,
                     "wall_us": t["wall_s"] * 1e6, "same": all(bool(jnp.array_equal(a, b)) for a, b in zip(y, first)),
                     "kernels_us_per_call": t.get("kernels_us_per_call")}
            log(f"quantize_x {cols} columns, {per} groups per program: {entry['device_us']} us, same={entry['same']}")
            out.append(entry)
    return out


def check_all(key, deadline: float, log=print) -> list:
    """Every format through the default tilings of each code path (float and integer modes; 1, 3 and
    17 tokens; bf16 and f16, which differ from f32 only in x's rounding before the kernel, on q4_k;
    q6_k's integer word kernels also on 768 columns, odd super-blocks per row; q4_k's and q5_k's dot
    tiles also reading bytes and loading a chunk ahead, one token unsplit (two chunks ahead through the
    loop, not only its peeled end), two splits adding atomically, one float token on words, the
    overrides recorded: "words": False, "prefetch": True, "ksplit": 1, "atomic": True, "float_words": True)
    against the reference on fresh random inputs, small shapes: [{fmt, act, n, cols, max_err_over_scale,
    ok}]."""
    from numlab.kernels import tuning
    out = []
    cpu_int = {"q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k", "q8_0": "q8_0"}
    for i, (fmt, cols) in enumerate((("q4_k", 1024), ("q6_k", 1024), ("q8_0", 1024), ("q5_k", 1024), ("q6_k", 768))):
        combos = [("f32", 1), ("q8_1", 1), ("q8_1", 17), ("f32", 17), (cpu_int[fmt], 3)]
        combos = [("q8_1", 1), ("q8_k", 3)] if cols == 768 else combos
        combos += [("bf16", 3), ("f16", 1)] if fmt == "q4_k" else []
        combos += [(act, 17, {"words": False}) for act in ("q8_1", "q8_k")] if fmt in ("q4_k", "q5_k") else []
        combos += [("q8_1", 17, {"prefetch": True})] if fmt in ("q4_k", "q5_k") else []
        combos += [("q8_1", 1, {"ksplit": 1})] if cols == 1024 else []      # two chunks ahead in a loop
        combos += [("q8_1", 1, {"ksplit": 2, "atomic": True})] if cols == 1024 else []
        combos += [(act, 1, {"float_words": True, "rows": 16, "prefetch": True, "unroll": 2})
                   for act in ("f32", "bf16")] if cols == 1024 or fmt == "q6_k" else []
        ws = random_weights(jax.random.fold_in(key, i), fmt, 1, 256, cols)
        for j, (act, n, *rest) in enumerate(combos):
            overrides = dict(*rest)
            case = Case(fmt, 256, cols, n, act, "check")
            entry = {"fmt": fmt, "act": act, "n": n, "cols": cols, **overrides}
            if time.perf_counter() > deadline:
                entry["skipped_for_time"] = True
                out.append(entry)
                continue
            cfg = tuning.config_for(fmt, act, n, 256, cols)
            cfg = dataclasses.replace(cfg, **overrides)
            x = jax.random.normal(jax.random.fold_in(key, 100 * i + j), (n, cols), jnp.float32)
            try:
                y = kernel_product(case, cfg)(ws[0], x)
                ref = reference_product(case)(ws[0], x)
                w_deq = dequantizer(fmt)(ws[0].data)
                entry["max_err_over_scale"] = _rel_err(y, ref, w_deq, x)
                entry["ok"] = bool(entry["max_err_over_scale"] <= CHECK_RTOL)
            except Exception as e:  # recorded, the run goes on
                entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            entry["config"] = config_dict(cfg)
            log(f"check {fmt} {cols} columns act={act} n={n}: ok={entry['ok']} "
                f"{entry.get('max_err_over_scale', entry.get('error'))}")
            out.append(entry)
    return out


def with_ggml(result: dict) -> dict:
    """result with every timing's ggml_us and ggml_over_ours (and ggml_source) taken from ggml_source()'s
    figures: for a run made before the peer was measured in the same device session."""
    def refresh(node, g):
        if isinstance(node, dict):
            if "ggml_us" in node:
                seconds = (node["device_us"] or node["wall_us"]) * 1e-6
                node.update(ggml_us=g, ggml_over_ours=None if g is None else g * 1e-6 / seconds)
            for v in node.values():
                refresh(v, g)
        elif isinstance(node, list):
            for v in node:
                refresh(v, g)

    for c in result["cases"]:
        refresh(c, ggml_time_us(Case(**c["case"])))
    return dict(result, ggml_source=ggml_source())


def table(result: dict) -> str:
    """One line per case: reference, first variant (the tuned config), best kernel and ggml times
    (device us), ratios."""
    lines = [f"{'case':60s} {'xla us':>9s} {'tuned us':>9s} {'best us':>9s} {'ggml us':>8s} {'ggml/best':>9s} "
             f"{'of copy':>7s} {'of read':>7s}"]
    for c in result["cases"]:
        case = Case(**c["case"])
        best = c.get("best")
        r, b = cold_us_or_nan(c.get("reference")), cold_us_or_nan(best)
        g = ggml_time_us(case)
        ratio = f"{g / b:9.2f}" if g and best else " " * 9
        frac = f"{best['cold']['of_copy_bandwidth']:7.2f}" if best else " " * 7
        read = best["cold"].get("weights_of_read_rate") if best else None
        frac += f" {read:7.2f}" if read is not None else " " * 8
        f = cold_us_or_nan((c.get("variants") or [None])[0])
        lines.append(f"{case.name:60s} {r:9.1f} {f:9.1f} {b:9.1f} {(g or float('nan')):8.1f} {ratio} {frac}")
    return "\n".join(lines)
