"""Sweeps with jax.vmap over inputs and precisions: input families, quantized matvecs along named
paths, chains of normalised matvecs, SiLU's exp routes; grids run in chunks through a ChunkStore.

A *path* names one way to compute y = W·x: "<act>" (numlab.ops.qmatvec's activation mode, f32
accumulation), optionally followed by ".acc=<f64|f32>" and, for float acts, ".order=<xla|pairwise|
sequential>" (products in the accumulator dtype, summed in that order by numlab.ops.rsum).
Errors are measured in float64 (scripts and tests enable jax_enable_x64).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from numlab.analysis import metrics
from numlab.formats import QTensor, row_bytes
from numlab.io import ChunkStore
from numlab.ops import ACCS, ACTS, ORDERS, acts_for, jdtype, qmatvec, rsum, silu

FAMILIES = ("normal", "uniform", "lognormal", "outlier5", "outlier100")
_OUTLIER_FACTOR = {"outlier5": 5.0, "outlier100": 100.0}


def family_index(name: str) -> int:
    """Position of input family `name` in FAMILIES (ValueError listing them otherwise)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown input family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES.index(name)


def family_input(key, family, n: int, scale=1.0, outlier_frac: float = 0.01):
    """float32 [n] from input family number `family` (FAMILIES order, may be traced) times `scale`:
    normal N(0,1); uniform U(-1,1); lognormal ±exp(N(0,1)); outlierF: N(0,1) with a random
    `outlier_frac` of the entries set to ±F."""
    k_val, k_sign, k_out = jax.random.split(key, 3)
    normal = jax.random.normal(k_val, (n,), jnp.float32)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)
    is_out = jax.random.bernoulli(k_out, outlier_frac, (n,))
    candidates = jnp.stack([
        normal,
        jax.random.uniform(k_val, (n,), jnp.float32, -1.0, 1.0),
        sign * jnp.exp(normal),
        jnp.where(is_out, _OUTLIER_FACTOR["outlier5"] * sign, normal),
        jnp.where(is_out, _OUTLIER_FACTOR["outlier100"] * sign, normal),
    ])
    return candidates[family] * jnp.asarray(scale, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_weight(key, shape: tuple, fmt: str) -> QTensor:
    """A [..., rows, cols] matrix with N(0, 1/cols) entries quantized to `fmt` (a QTensor)."""
    w = jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])
    return QTensor.from_float(w, fmt)


def random_weights(key, n: int, shape: tuple, fmt: str) -> QTensor:
    """n matrices of random_weight stacked on a leading axis, quantized one at a time (one compile
    per format and shape, shared by every sweep in the process)."""
    ws = [random_weight(jax.random.fold_in(key, i), tuple(shape), fmt) for i in range(n)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ws)


def take(tree, i):
    """Entry i (may be traced) of every leaf's leading axis, e.g. one matrix of a QTensor stack."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


@dataclasses.dataclass(frozen=True)
class Path:
    """One way to compute W·x: qmatvec's `act` and `acc`, or, with `order`, float products in acc
    summed in that order."""

    act: str
    acc: str = "f32"
    order: str | None = None


def parse_path(text: str) -> Path:
    """"q8_k", "f32.acc=f64", "f32.order=sequential" -> Path (ValueError naming what is valid)."""
    act, *fields = text.split(".")
    if act not in ACTS:
        raise ValueError(f"path {text!r}: unknown act {act!r}; valid: {', '.join(ACTS)}")
    kw = {}
    for field in fields:
        key, _, value = field.partition("=")
        valid = {"acc": ACCS, "order": ORDERS}.get(key)
        if valid is None or value not in valid:
            raise ValueError(f"path {text!r}: bad field {field!r}; valid: acc=<{'|'.join(ACCS)}>, "
                             f"order=<{'|'.join(ORDERS)}>")
        kw[key] = value
    path = Path(act, **kw)
    if path.order is not None and act not in ("f64", "f32", "bf16", "f16"):
        raise ValueError(f"path {text!r}: order applies to float acts only, not {act!r}")
    return path


def path_applies(text: str, fmt: str) -> bool:
    """Whether path `text` is defined for weights in format `fmt` (q8_k needs k-quant weights...)."""
    return parse_path(text).act in acts_for(fmt)


def path_dtype(text: str):
    """The dtype of path `text`'s output: float64 for act f64, else its accumulator's."""
    path = parse_path(text)
    return jdtype("f64" if path.act == "f64" else path.acc)


def matvec(w: QTensor, x, text: str):
    """y = W·x along path `text` (see the module docstring), in path_dtype(text)."""
    path = parse_path(text)
    if path.order is None:
        return qmatvec(w, x, path.act, path.acc)
    dt = path_dtype(text)
    xr = jnp.asarray(x).astype(jdtype(path.act)).astype(dt)
    return rsum(w.dequantize().astype(dt) * xr[..., None, :], axis=-1, order=path.order)


def compare(y, ref) -> dict:
    """Errors of y against ref over the last axis, in float64: relative L2, 1 − cos, and the largest
    absolute difference over the largest |ref| (max_rel)."""
    y = jnp.asarray(y).astype(jnp.float64)
    ref = jnp.asarray(ref).astype(jnp.float64)
    return {"rel_l2": metrics.rel_l2(y, ref),
            "one_minus_cos": metrics.one_minus_cos(y, ref),
            "max_rel": metrics.max_abs_diff(y, ref) / jnp.max(jnp.abs(ref), axis=-1)}


def pair_key(a: str, b: str) -> str:
    """The name of the comparison of path a against path b in results: "a|b"."""
    return f"{a}|{b}"


@functools.cache
def _batched_matvec(text: str):
    return jax.jit(jax.vmap(lambda w, x: matvec(w, x, text)))


@functools.cache
def _batched_chain(text: str):
    def run(ws, x):
        def step(state, w):
            y = matvec(w, state, text)
            y = y / jnp.linalg.norm(y)
            return y, y
        return jax.lax.scan(step, x.astype(path_dtype(text)), ws)[1]
    return jax.jit(jax.vmap(run))


_compare = jax.jit(compare)
_norm = jax.jit(lambda y: jnp.linalg.norm(y.astype(jnp.float64), axis=-1))


def _all_paths(paths, ref, pairs) -> list:
    return list(dict.fromkeys(list(paths) + [ref] + [p for ab in pairs for p in ab]))


def _comparisons(ys: dict, paths, ref: str, pairs) -> dict:
    return {"vs_ref": {p: _compare(ys[p], ys[ref]) for p in paths},
            "pairs": {pair_key(a, b): _compare(ys[a], ys[b]) for a, b in pairs}}


def matvec_points(w: QTensor, x, paths, ref: str, pairs=()) -> dict:
    """For a batch (w stacks B matrices, x [B, cols]): every path's output compared with path `ref`,
    each (a, b) of `pairs` compared (b as the reference), and the L2 norm of ref's output; each path
    runs as its own jitted function (compiled once per path and shape, shared by all sweeps)."""
    ys = {p: _batched_matvec(p)(w, x) for p in _all_paths(paths, ref, pairs)}
    return {**_comparisons(ys, paths, ref, pairs), "ref_norm": _norm(ys[ref])}


def chain_points(ws: QTensor, x, paths, ref: str, pairs=()) -> dict:
    """For a batch of chains (ws stacks [B, N] square matrices, x [B, d]): N matvecs, each output
    L2-normalised in its path's dtype before the next; every path's state after each step compared
    with ref's ([B, N] per metric), and each (a, b) pair likewise."""
    ys = {p: _batched_chain(p)(ws, x) for p in _all_paths(paths, ref, pairs)}
    return _comparisons(ys, paths, ref, pairs)


@functools.partial(jax.jit, static_argnames=("n", "outlier_frac"))
def family_inputs(keys, families, scales, *, n: int, outlier_frac: float = 0.01):
    """family_input for a batch: keys [B], family numbers [B], scales [B] -> float32 [B, n]."""
    return jax.vmap(lambda k, f, s: family_input(k, f, n, s, outlier_frac))(keys, families, scales)


def silu_point(radius, n: int, pairs) -> dict:
    """SiLU on n evenly spaced points of [-radius, radius] along routes "dtype/exp" (e.g. "f32/exp2");
    for each (a, b) of `pairs`, a against b: elementwise max relative error and relative L2."""
    x = radius * jnp.linspace(-1.0, 1.0, n, dtype=jnp.float64)
    routes = dict.fromkeys(r for ab in pairs for r in ab)
    ys = {r: silu(x, *r.split("/")).astype(jnp.float64) for r in routes}
    return {pair_key(a, b): {"max_rel": jnp.max(jnp.abs(ys[a] - ys[b]) / jnp.abs(ys[b])),
                             "rel_l2": metrics.rel_l2(ys[a], ys[b])} for a, b in pairs}


_SEP = "::"


def _flatten(tree, prefix="") -> dict:
    """Nested dicts of arrays -> {"a::b::c": numpy array}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}{_SEP}").items()}
    return {prefix[:-len(_SEP)]: np.asarray(tree)}


def _unflatten(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(_SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def map_chunked(batch_fn, args: tuple, chunk: int, store: ChunkStore | None = None, progress=None) -> dict:
    """batch_fn(*args_chunk) -> nested dict of arrays [chunk, ...], over the leading axis of `args` in
    chunks of `chunk` points (the last one padded by repeating the last point, then cut); finished
    chunks are saved to / reloaded from `store`. Returns the dict with numpy leaves of leading axis n."""
    leaves = jax.tree_util.tree_leaves(args)
    n = int(leaves[0].shape[0])
    if chunk < 1 or any(int(a.shape[0]) != n for a in leaves):
        raise ValueError(f"map_chunked: chunk {chunk} must be >= 1 and every argument must share the "
                         f"leading axis {n}; got {[tuple(a.shape) for a in leaves]}")
    starts = range(0, n, chunk)
    pieces = []
    for i in (progress(starts) if progress else starts):
        if store is not None and store.done(i):
            pieces.append(store.load(i))
            continue
        idx = jnp.minimum(jnp.arange(i, i + chunk), n - 1)
        out = batch_fn(*jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), args))
        piece = {k: v[:min(chunk, n - i)] for k, v in _flatten(out).items()}
        if store is not None:
            store.save(i, piece)
        pieces.append(piece)
    return _unflatten({k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]})


def vmap_chunked(fn, args: tuple, chunk: int, store: ChunkStore | None = None, progress=None, shared=()):
    """map_chunked of jit(vmap(fn)): fn(*point_args, *shared) -> nested dict, `shared` passed whole
    to every point."""
    batched = jax.jit(jax.vmap(fn, in_axes=(0,) * len(args) + (None,) * len(shared)))
    return map_chunked(lambda *a: batched(*a, *shared), args, chunk, store, progress)


# ---------------------------------------------------------------------------------------------
# Experiments: cfg (an ml_collections ConfigDict, see base_config) -> JSON-able result dict.

@dataclasses.dataclass
class Context:
    """What an experiment gets besides its config: a chunk store per named grid (or None: no
    resuming) and a progress wrapper for iterables (tqdm in scripts)."""

    store: callable = lambda name: None
    progress: callable = lambda it, desc=None, total=None: it


def matrix_dims(size: str, matrix: str) -> tuple:
    """(rows, cols) of the model's matrix role `matrix` at `size`: ffn_down (d_model × d_expert),
    ffn_up (d_expert × d_model), attn_k (n_kv_heads·head_dim × d_model), square (d_model²)."""
    from numlab.models import config
    c = config.get(size)
    dims = {"ffn_down": (c.d_model, c.d_expert), "ffn_up": (c.d_expert, c.d_model),
            "attn_k": (c.n_kv_heads * c.head_dim, c.d_model), "square": (c.d_model, c.d_model)}
    if matrix not in dims:
        raise ValueError(f"unknown matrix role {matrix!r}; valid: {', '.join(dims)}")
    return dims[matrix]


def share_verdict(candidate: float, baseline: float) -> str:
    """falsified (< 1% of the baseline difference), partial (< 50%) or confirmed."""
    share = candidate / baseline if baseline > 0 else math.inf
    return "falsified" if share < 0.01 else "partial" if share < 0.5 else "confirmed"


def bisect_verdict(a: str, b: str, d_ab: float, d_ac: float, d_bc: float, ref: str) -> str:
    """Which of paths a and b is the odd one out against the exact path `ref` (10× rule)."""
    if d_ac > 10 * d_bc:
        return f"{a} is the outlier: {b} agrees with {ref} ({d_bc:.2e}), {a} differs from both ({d_ab:.2e})"
    if d_bc > 10 * d_ac:
        return f"{b} is the outlier: {a} agrees with {ref} ({d_ac:.2e}), {b} differs from both ({d_ab:.2e})"
    return f"neither {a} nor {b} is closer to {ref} ({d_ac:.2e} vs {d_bc:.2e})"


def _grid(*axes):
    """Flattened cartesian product of the index ranges of `axes` lengths -> list of int32 arrays."""
    mesh = np.meshgrid(*[np.arange(n) for n in axes], indexing="ij")
    return [jnp.asarray(m.reshape(-1), jnp.int32) for m in mesh]


def _reshape(tree, shape):
    return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(tuple(shape) + a.shape[1:]), tree)


def _seed_stats(tree):
    """Mean and max over the last (seed) axis of every leaf."""
    return {"mean": jax.tree_util.tree_map(lambda a: a.mean(-1), tree),
            "max": jax.tree_util.tree_map(lambda a: a.max(-1), tree)}


def _pairs(cfg):
    pairs = [tuple(p) for p in cfg.get("pairs", ())]
    for name in ("candidate", "baseline", "bisect"):
        if cfg.get(name):
            pairs.append(tuple(cfg[name]))
    if cfg.get("bisect"):
        a, b = cfg.bisect
        pairs += [(a, cfg.ref), (b, cfg.ref)]
    return list(dict.fromkeys(pairs))


def _weight_sources(cfg, key, weight=None) -> list:
    """[(fmt, rows, cols, stack)]: cfg.n_seeds random matrices per format of cfg.formats, or the given
    QTensor's top-left cfg.rows × cfg.cols (0: all) as a stack of one."""
    if weight is None:
        rows, cols = (cfg.rows, cfg.cols) if cfg.get("rows") else matrix_dims(cfg.size, cfg.matrix)
        return [(fmt, rows, cols, random_weights(key, cfg.n_seeds, (rows, cols), fmt)) for fmt in cfg.formats]
    rows, cols = min(cfg.get("rows") or weight.shape[0], weight.shape[0]), min(cfg.get("cols") or weight.shape[1],
                                                                             weight.shape[1])
    data = weight.data[None, :rows, :row_bytes(weight.fmt, cols)]
    return [(weight.fmt, rows, cols, QTensor.from_bytes(data, weight.fmt, (rows, cols)))]


def matvec_grid(cfg, ctx: Context, weight=None) -> dict:
    """Every path of cfg.paths against cfg.ref on one matvec, over weight formats × input families ×
    input scales × seeds (vmapped, chunked); verdict from cfg.candidate vs cfg.baseline, or cfg.bisect.
    Seed k uses random matrix k (or the given QTensor `weight`) and its own input."""
    families, scales, n_seeds = list(cfg.families), list(cfg.scales), cfg.n_seeds
    fam_idx = jnp.asarray([family_index(f) for f in families], jnp.int32)
    scale_arr = jnp.asarray(scales, jnp.float32)
    fi, si, ki = _grid(len(families), len(scales), n_seeds)
    key_w, key_x = jax.random.split(jax.random.key(cfg.seed))
    kx = jax.vmap(lambda i: jax.random.fold_in(key_x, i))(jnp.arange(fi.shape[0]))
    out = {}
    for fmt, rows, cols, ws in ctx.progress(_weight_sources(cfg, key_w, weight), desc="formats"):
        paths = [p for p in cfg.paths if path_applies(p, fmt)]
        pairs = [ab for ab in _pairs(cfg) if all(path_applies(p, fmt) for p in ab)]
        n_w = ws.data.shape[0]

        def batch(f, sc, k, k_x, ws=ws, cols=cols, paths=paths, pairs=pairs, n_w=n_w):
            x = family_inputs(k_x, fam_idx[f], scale_arr[sc], n=cols, outlier_frac=cfg.outlier_frac)
            return matvec_points(take(ws, k % n_w), x, paths, cfg.ref, pairs)
        res = map_chunked(batch, (fi, si, ki, kx), cfg.chunk, ctx.store(f"matvec-{fmt}"),
                          lambda it, fmt=fmt: ctx.progress(it, desc=f"{fmt} chunks"))
        res = _seed_stats(_reshape(res, (len(families), len(scales), n_seeds)))
        out[fmt] = {"rows": rows, "cols": cols, **res}
    return _matvec_summary(cfg, out, families, scales)


def _lookup(stats, pair, metric):
    key = pair_key(*pair)
    return np.asarray(stats["pairs"][key][metric]) if key in stats.get("pairs", {}) else None


def _matvec_summary(cfg, out, families, scales) -> dict:
    metric = cfg.metric
    figures, notes, verdict = {}, [], None
    for fmt, res in out.items():
        mean = res["mean"]
        for name in ("candidate", "baseline"):
            if cfg.get(name) and _lookup(mean, cfg[name], metric) is not None:
                figures[f"{fmt} {name} {pair_key(*cfg[name])} {metric}"] = _lookup(mean, cfg[name], metric)
        if cfg.get("candidate") and cfg.get("baseline"):
            cand, base = _lookup(mean, cfg.candidate, metric), _lookup(mean, cfg.baseline, metric)
            if cand is not None and base is not None:
                verdict = share_verdict(float(cand.max()), float(base.min()))
                notes.append(f"{fmt}: {pair_key(*cfg.candidate)} {metric} {_span(cand)} vs "
                             f"{pair_key(*cfg.baseline)} {_span(base)} (x{float(cand.max() / base.min()):.1e})")
        if cfg.get("bisect"):
            a, b = cfg.bisect
            d = {k: float(_lookup(mean, p, metric).max()) for k, p in
                 (("ab", (a, b)), ("ac", (a, cfg.ref)), ("bc", (b, cfg.ref)))}
            for k, p in (("ab", (a, b)), ("ac", (a, cfg.ref)), ("bc", (b, cfg.ref))):
                figures[f"{fmt} {pair_key(*p)} {metric}"] = d[k]
                figures[f"{fmt} {pair_key(*p)} one_minus_cos"] = float(
                    _lookup(mean, p, "one_minus_cos").max())
            verdict = bisect_verdict(a, b, d["ab"], d["ac"], d["bc"], cfg.ref)
            notes.append(f"{fmt}: " + ", ".join(f"{pair_key(*p)} {d[k]:.2e}" for k, p in
                                                (("ab", (a, b)), ("ac", (a, cfg.ref)), ("bc", (b, cfg.ref)))))
        if not (cfg.get("candidate") or cfg.get("bisect")):
            notes.append(f"{fmt}: " + ", ".join(f"{p} {_span(m[metric])}" for p, m in mean["vs_ref"].items()
                                                if p != cfg.ref) + f" vs {cfg.ref}")
        figures[f"{fmt} ref output L2"] = mean["ref_norm"]
    return {"figures": figures, "measured": "; ".join(notes), "verdict": verdict or "measured",
            "data": {"families": families, "scales": scales, "metric": metric, "by_format": out},
            "plots": _matvec_plots(cfg, out, families, scales)}


def _span(a) -> str:
    a = np.asarray(a).reshape(-1)
    return f"{a.min():.2e}" if a.size == 1 or a.min() == a.max() else f"{a.min():.2e}..{a.max():.2e}"


def _matvec_plots(cfg, out, families, scales) -> list:
    plots = []
    by_family = len(families) > 1 or len(scales) == 1
    for fmt, res in out.items():
        mean = res["mean"]
        series = {p: m[cfg.metric] for p, m in mean["vs_ref"].items() if p != cfg.ref}
        series.update({k: m[cfg.metric] for k, m in mean.get("pairs", {}).items()})
        x = families if by_family else scales
        series = {k: (np.asarray(v)[:, 0] if by_family else np.asarray(v)[0, :]) for k, v in series.items()}
        plots.append({"title": f"{fmt} {res['rows']}×{res['cols']}: {cfg.metric} of each path against {cfg.ref}, "
                               f"and of pairs a|b (mean of {cfg.n_seeds} seeds)",
                      "kind": "bars" if by_family else "lines", "x": x, "series": series, "logy": True,
                      "logx": not by_family, "xlabel": "input family" if by_family else "input scale",
                      "ylabel": cfg.metric})
    return plots


def chain(cfg, ctx: Context) -> dict:
    """Chains of cfg.n_max square matvecs with L2 normalisation between, every path against cfg.ref
    after each step N = 1..n_max, per weight format, vmapped over seeds; verdict from candidate vs
    baseline, and the growth of the baseline's 1 − cos from N = 1 to n_max."""
    d = cfg.rows or matrix_dims(cfg.size, "square")[0]
    key_w, key_x = jax.random.split(jax.random.key(cfg.seed))
    keys = jax.random.split(key_x, cfg.n_seeds)
    fam = family_index(cfg.family)
    out, figures, notes, verdict = {}, {}, [], "measured"
    for fmt in ctx.progress(list(cfg.formats), desc="formats"):
        paths = [p for p in cfg.paths if path_applies(p, fmt)]
        pairs = [ab for ab in _pairs(cfg) if all(path_applies(p, fmt) for p in ab)]

        ws = random_weights(key_w, cfg.n_seeds, (cfg.n_max, d, d), fmt)

        def batch(k, k_x, ws=ws, paths=paths, pairs=pairs):
            x = family_inputs(k_x, jnp.full(k.shape, fam), jnp.ones(k.shape, jnp.float32), n=d,
                              outlier_frac=cfg.outlier_frac)
            return chain_points(take(ws, k), x, paths, cfg.ref, pairs)
        res = _seed_stats(jax.tree_util.tree_map(lambda a: np.moveaxis(a, 0, -1), map_chunked(
            batch, (jnp.arange(cfg.n_seeds), keys), cfg.chunk, ctx.store(f"chain-{fmt}"),
            lambda it, fmt=fmt: ctx.progress(it, desc=f"{fmt} chunks"))))
        out[fmt] = res
        cand = _lookup(res["mean"], cfg.candidate, cfg.metric)
        base = _lookup(res["mean"], cfg.baseline, cfg.metric)
        base_cos = _lookup(res["mean"], cfg.baseline, "one_minus_cos")
        growth = float(base_cos[-1] / base_cos[0])
        verdict = share_verdict(float(cand.max()), float(base.min()))
        worst = int(np.argmax(cand))
        figures.update({f"{fmt} candidate {cfg.metric} N=1..{cfg.n_max}": [float(cand.min()), float(cand.max())],
                        f"{fmt} candidate worst N": worst + 1,
                        f"{fmt} baseline {cfg.metric} N=1..{cfg.n_max}": [float(base.min()), float(base.max())],
                        f"{fmt} baseline 1-cos growth N=1->{cfg.n_max}": growth})
        notes.append(f"{fmt}: {pair_key(*cfg.candidate)} {cfg.metric} {_span(cand)} (max at N={worst + 1}); "
                     f"{pair_key(*cfg.baseline)} {_span(base)}, its 1-cos grows x{growth:.1f} over {cfg.n_max} steps")
    steps = list(range(1, cfg.n_max + 1))
    plots = [{"title": f"{fmt} chain of {d}×{d} matvecs: {cfg.metric} of each path against {cfg.ref}, and of "
                       f"pairs a|b (mean of {cfg.n_seeds} seeds)",
              "kind": "lines", "x": steps, "xlabel": "chain length N", "ylabel": cfg.metric, "logy": True,
              "series": {**{p: m[cfg.metric] for p, m in res["mean"]["vs_ref"].items() if p != cfg.ref},
                         **{k: m[cfg.metric] for k, m in res["mean"].get("pairs", {}).items()}}}
             for fmt, res in out.items()]
    return {"figures": figures, "measured": "; ".join(notes), "verdict": verdict,
            "data": {"d": d, "steps": steps, "by_format": out}, "plots": plots}


def silu_sweep(cfg, ctx: Context) -> dict:
    """SiLU routes compared on [-r, r] for each radius of cfg.radii (vmapped); verdict: falsified
    when the candidate pair's max relative error stays below cfg.threshold."""
    pairs = [tuple(p) for p in cfg.pairs]
    res = vmap_chunked(lambda r: silu_point(r, cfg.n_points, pairs), (jnp.asarray(cfg.radii, jnp.float64),),
                       cfg.chunk, ctx.store("silu"), lambda it: ctx.progress(it, desc="radii"))
    cand = res[pair_key(*cfg.candidate)]["max_rel"]
    verdict = "falsified" if float(cand.max()) < cfg.threshold else "confirmed"
    return {"figures": {f"{pair_key(*cfg.candidate)} max_rel per radius": cand},
            "measured": f"{pair_key(*cfg.candidate)} max rel {_span(cand)} over radii {list(cfg.radii)} "
                        f"(threshold {cfg.threshold:.0e})",
            "verdict": verdict, "data": {"radii": list(cfg.radii), "pairs": res},
            "plots": [{"title": f"SiLU on [-r, r], {cfg.n_points} points", "kind": "lines", "x": list(cfg.radii),
                       "xlabel": "radius r", "ylabel": "max relative error", "logy": True, "logx": True,
                       "series": {k: v["max_rel"] for k, v in res.items()}}]}


# ---------------------------------------------------------------------------------------------
# Model-level experiments: several policies run on the same prompts (vmapped over prompts, chunked).

@functools.cache
def get_model(size: str, seed: int = 0, path: str = ""):
    """The model of a config: the GGUF file at `path`, else synthetic make_model(size, seed) (cached)."""
    if path:
        from numlab.models.gguf_io import load_gguf
        return load_gguf(path)
    from numlab.models.synthetic import make_model
    return make_model(size, seed)


MODEL_EXPERIMENTS = ("model_runs", "model_matvec", "mca_model")


def model_of(cfg):
    """The model a config runs on: get_model(cfg.size, cfg.seed, cfg.model or "")."""
    return get_model(cfg.size, cfg.seed, cfg.get("model", ""))


def model_tensor(size: str, seed: int, pattern: str, expert: int = 0, fmt: str = "", path: str = "") -> tuple:
    """(name, 2-D QTensor): the first matrix (file order) of the model whose name matches glob `pattern`
    and, if given, whose format is `fmt`; expert `expert` of an expert stack."""
    import fnmatch
    model = get_model(size, seed, path)
    names = [n for n, t in model.tensors.items() if isinstance(t, QTensor) and fnmatch.fnmatchcase(n, pattern)
             and (not fmt or t.fmt == fmt)]
    if not names:
        raise ValueError(f"no matrix of the {size} model matches {pattern!r}" + (f" in {fmt}" if fmt else "")
                         + f"; matrices: {', '.join(n for n, t in model.tensors.items() if isinstance(t, QTensor))}")
    w = model.tensors[names[0]]
    return names[0], (QTensor(w.data[expert], w.fmt, w.shape) if w.data.ndim == 3 else w)


def prompt_tokens(seed: int, n_prompts: int, n_tokens: int, vocab: int):
    """int32 [n_prompts, n_tokens] uniform random token ids (synthetic weights have no real text)."""
    return jax.random.randint(jax.random.key(seed), (n_prompts, n_tokens), 0, vocab, jnp.int32)


@functools.cache
def _runner(policy_text: str, capture: tuple, forced: bool):
    from numlab.models.qwen3_moe import forward

    def one(model, tokens, force):
        return forward(model, tokens, policy_text, force_experts=force if forced else None, capture=capture)
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def run_policy(model, tokens, policy_text: str, capture=(), force_experts=None):
    """forward under a policy for a batch of prompts tokens [P, T] (jitted once per policy, capture and
    forcing); force_experts [P, L, T, k] replays expert choices. A Trace with a leading prompt axis."""
    force = jnp.zeros(tokens.shape[:1], jnp.int32) if force_experts is None else force_experts
    return _runner(policy_text, tuple(capture), force_experts is not None)(model, tokens, force)


@jax.jit
def _trace_pair(a, b, capture_a: dict, capture_b: dict) -> dict:
    """Per prompt, layer and token: run a against run b (b the reference)."""
    out = {"cos": metrics.cosine(a.resid, b.resid), "one_minus_cos": metrics.one_minus_cos(a.resid, b.resid),
           "rel_l2": metrics.rel_l2(a.resid, b.resid),
           "router_cos": metrics.cosine(a.router_logits, b.router_logits),
           "swaps": metrics.swaps(b.topk_idx, a.topk_idx), "margin": b.margin,
           "top1_agree": metrics.argmax_agree(b.logits, a.logits), "kld": metrics.kld(b.logits, a.logits)}
    for name in capture_a:
        ya, yb = capture_a[name], capture_b[name]
        flat = lambda y: y.reshape(y.shape[:3] + (-1,))  # noqa: E731  [P, L, T, ...] -> [P, L, T, n]
        out[f"site_one_minus_cos/{name}"] = metrics.one_minus_cos(flat(ya), flat(yb))
    return out


@jax.jit
def _run_stats(tr) -> dict:
    """Per prompt: last position's argmax token, non-finite logits, first layer whose residual stream
    holds a non-finite value (L if none)."""
    bad = ~jnp.all(jnp.isfinite(tr.resid), axis=(-1, -2))           # [P, L]
    n_layers = tr.resid.shape[1]
    first = jnp.min(jnp.where(bad, jnp.arange(n_layers), n_layers), axis=-1)
    return {"next_token": jnp.argmax(tr.logits[:, -1], axis=-1),
            "nonfinite_logits": jnp.sum(~jnp.isfinite(tr.logits), axis=(-1, -2)), "first_bad_layer": first}


def model_runs(cfg, ctx: Context) -> dict:
    """cfg.runs ({name: policy text}) on cfg.n_prompts random prompts of
    cfg.n_tokens tokens, vmapped over prompts in chunks; cfg.forced pairs (a, b) add the run "a@b": a's
    policy with b's expert choices. Every (a, b) of cfg.pairs (and a@b against b) is compared per layer;
    the verdict follows cfg.rule (see _RULES)."""
    model = model_of(cfg)
    tokens = prompt_tokens(cfg.seed, cfg.n_prompts, cfg.n_tokens, model.config.vocab)
    runs = dict(cfg.runs)
    forced = [tuple(p) for p in cfg.get("forced", ())]
    pairs = [tuple(p) for p in cfg.pairs] + [(f"{a}@{b}", b) for a, b in forced]
    capture = tuple(cfg.get("capture", ()))

    def batch(tok):
        traces = {n: run_policy(model, tok, text, capture) for n, text in runs.items()}
        for a, b in forced:
            traces[f"{a}@{b}"] = run_policy(model, tok, runs[a], capture, traces[b].topk_idx)
        return {"pairs": {pair_key(a, b): _trace_pair(traces[a], traces[b], traces[a].sites, traces[b].sites)
                          for a, b in pairs},
                "runs": {n: _run_stats(tr) for n, tr in traces.items()}}
    res = map_chunked(batch, (tokens,), cfg.chunk, ctx.store("prompts"),
                      lambda it: ctx.progress(it, desc="prompt chunks"))
    summary = {"layers": model.config.n_layers, "runs": runs,
               "pairs": {k: _pair_summary(v) for k, v in res["pairs"].items()},
               "per_run": {n: {k: np.asarray(v).tolist() for k, v in st.items()} for n, st in res["runs"].items()}}
    rule = _RULES[cfg.rule]
    figures, measured, verdict = rule(cfg, summary, model, tokens)
    return {"figures": figures, "measured": measured, "verdict": verdict, "data": summary,
            "plots": _model_plots(cfg, summary)}


def _pair_summary(p: dict) -> dict:
    """Per layer (over prompts and tokens): mean/min cosine, mean 1 − cos, share of tokens whose expert
    set changed, mean/max swaps, router-logit cosine; per prompt: last-token argmax agreement, KLD."""
    out = {"cos_mean": p["cos"].mean((0, 2)), "cos_min": p["cos"].min((0, 2)),
           "one_minus_cos_mean": p["one_minus_cos"].mean((0, 2)), "rel_l2_mean": p["rel_l2"].mean((0, 2)),
           "router_cos_mean": p["router_cos"].mean((0, 2)), "router_cos_min": p["router_cos"].min((0, 2)),
           "swap_share": (p["swaps"] > 0).mean((0, 2)), "swaps_mean": p["swaps"].mean((0, 2)),
           "swaps_max": p["swaps"].max((0, 2)), "margin_median": np.median(p["margin"], axis=(0, 2)),
           "last_top1_agree": p["top1_agree"][:, -1], "top1_agree_share": float(p["top1_agree"].mean()),
           "kld_mean": float(p["kld"].mean())}
    for key, v in p.items():
        if key.startswith("site_one_minus_cos/"):
            out[key] = v.mean((0, 2))
    return out


def _worst(summary, key):
    s = summary["pairs"][key]
    layer = int(np.argmin(s["cos_mean"]))
    return layer, float(s["cos_mean"][layer])


def _rule_layers(cfg, summary, model, tokens):
    """H1-style: does the variant pair (pairs[1]) bring the base pair's (pairs[0]) layers closer?"""
    base, var = (pair_key(*p) for p in cfg.pairs[:2])
    thr, n = cfg.cos_threshold, summary["layers"]
    d_base = float(np.mean(summary["pairs"][base]["one_minus_cos_mean"]))
    d_var = float(np.mean(summary["pairs"][var]["one_minus_cos_mean"]))
    figs = {}
    for key in (base, var):
        above = int(np.sum(summary["pairs"][key]["cos_mean"] >= thr))
        layer, cos = _worst(summary, key)
        figs[key] = {"layers_cos_ge_threshold": above, "worst_layer": layer, "worst_cos": cos,
                     "mean_one_minus_cos": float(np.mean(summary["pairs"][key]["one_minus_cos_mean"]))}
    gain = (d_base - d_var) / d_base if d_base > 0 else 0.0
    measured = "; ".join(f"{k}: {v['layers_cos_ge_threshold']} of {n} layers cos ≥ {thr}, worst layer "
                         f"{v['worst_layer']} at {v['worst_cos']:.6f}" for k, v in figs.items())
    measured += f"; mean 1−cos reduced by {100 * gain:.3g}%"
    return {**figs, "reduction_share": gain}, measured, share_verdict(max(gain, 0.0), 1.0)


def _rule_routing(cfg, summary, model, tokens):
    """H2-style: at layer cfg.layer, do the runs of pairs[0] choose different expert sets?"""
    key = pair_key(*cfg.pairs[0])
    s = summary["pairs"][key]
    layer = cfg.layer % summary["layers"]
    k = model.config.n_experts_used
    figs = {"layer": layer, "router_cos_mean": float(s["router_cos_mean"][layer]),
            "router_cos_min": float(s["router_cos_min"][layer]), "swaps_max": int(s["swaps_max"][layer]),
            "swap_share": float(s["swap_share"][layer]), "k": k,
            "layers_with_swaps": [int(i) for i in np.nonzero(s["swaps_max"] > 0)[0]]}
    measured = (f"{key} layer {layer}: router cos {figs['router_cos_mean']:.6f} (min {figs['router_cos_min']:.6f}); "
                f"up to {figs['swaps_max']} of {k} experts swapped, {100 * figs['swap_share']:.1f}% of tokens; "
                f"layers with swaps: {figs['layers_with_swaps']}")
    return figs, measured, "confirmed" if figs["swaps_max"] > 0 else "falsified"


def _rule_next_token(cfg, summary, model, tokens):
    """H4-style: does the last position's argmax differ between the runs of pairs[0]?"""
    a, b = cfg.pairs[0]
    ta, tb = summary["per_run"][a]["next_token"], summary["per_run"][b]["next_token"]
    agree = [int(x == y) for x, y in zip(ta, tb)]
    s = summary["pairs"][pair_key(a, b)]
    figs = {"prompts": len(agree), "agree": sum(agree), f"{a}_tokens": ta, f"{b}_tokens": tb,
            "all_positions_top1_agree": s["top1_agree_share"], "kld_mean": s["kld_mean"]}
    diff = [f"prompt {i}: {a} {x}, {b} {y}" for i, (x, y) in enumerate(zip(ta, tb)) if x != y]
    measured = (f"{sum(agree)} of {len(agree)} prompts agree on the next token" + (f" ({'; '.join(diff[:4])})"
                if diff else "") + f"; all positions: {100 * s['top1_agree_share']:.1f}% same top token, "
                f"mean KLD {s['kld_mean']:.2e}")
    return figs, measured, "not benign" if diff else "benign"


def _rule_nonfinite(cfg, summary, model, tokens):
    """H0-style: which runs produce non-finite values, and the first site (forward order) that does
    (numlab.analysis.nonfinite, on the first prompt that has one)."""
    from numlab.analysis.nonfinite import first_nonfinite
    figs, notes = {}, []
    for name, st in summary["per_run"].items():
        if "@" in name:
            continue
        bad = int(np.sum(st["nonfinite_logits"]))
        first_layer = int(np.min(st["first_bad_layer"]))
        hit = None
        if bad or first_layer < summary["layers"]:
            prompt = (int(np.argmax(np.asarray(st["nonfinite_logits"]) > 0)) if bad
                      else int(np.argmin(st["first_bad_layer"])))
            hit = first_nonfinite(model, tokens[prompt], summary["runs"][name])
        figs[name] = {"nonfinite_logits": bad, "first_nonfinite": None if hit is None else hit._asdict()}
        notes.append(f"{name}: {bad} non-finite logits" + (f", first at {hit.site} token {hit.token}" if hit else ""))
    key = pair_key(*cfg.pairs[0])
    main = [figs[n]["nonfinite_logits"] for n in cfg.pairs[0]]
    cos = summary["pairs"][key]["cos_min"]
    measured = "; ".join(notes) + f"; {key} per-layer min cos {float(np.min(cos)):.6f}..{float(np.max(cos)):.6f}"
    verdict = ("no NaN/Inf in the compared paths: the reported NaN is a bug, not rounding" if not any(main)
               else "non-finite values from the compared policies themselves")
    return figs, measured, verdict


def _rule_compounding(cfg, summary, model, tokens):
    """The closing claim: per-matvec 1 − cos at layer 0 (captured site, identical inputs) against the
    residual stream's worst layer, and the share of that drop left when expert choices are forced."""
    key = pair_key(*cfg.pairs[0])
    a, b = cfg.forced[0]
    s, f = summary["pairs"][key], summary["pairs"][pair_key(f"{a}@{b}", b)]
    site = cfg.capture[0]
    per_matvec = float(s[f"site_one_minus_cos/{site}"][0])
    layer = int(np.argmax(s["one_minus_cos_mean"]))
    worst, forced_worst = float(s["one_minus_cos_mean"][layer]), float(f["one_minus_cos_mean"][layer])
    routing_share = 1 - forced_worst / worst if worst > 0 else 0.0
    figs = {"per_matvec_one_minus_cos": per_matvec, "worst_layer": layer, "worst_one_minus_cos": worst,
            "growth": worst / per_matvec if per_matvec > 0 else None,
            "forced_routing_one_minus_cos": forced_worst, "routing_share": routing_share,
            "min_cos_per_layer": s["cos_mean"].tolist(), "layers_with_swaps": int(np.sum(s["swaps_max"] > 0))}
    measured = (f"{key}: layer-0 {site} 1−cos {per_matvec:.2e} → worst layer {layer} 1−cos {worst:.2e} "
                f"(×{figs['growth'] or 0:.0f}); with {b}'s experts forced {forced_worst:.2e}: routing flips "
                f"carry {100 * routing_share:.0f}% of it")
    return figs, measured, "measured"


def _rule_measured(cfg, summary, model, tokens):
    figs = {}
    for key in (pair_key(*p) for p in cfg.pairs):
        layer, cos = _worst(summary, key)
        s = summary["pairs"][key]
        figs[key] = {"worst_layer": layer, "worst_cos": cos, "layers_with_swaps": int(np.sum(s["swaps_max"] > 0)),
                     "swap_share_mean": float(np.mean(s["swap_share"])),
                     "top1_agree_share": s["top1_agree_share"]}
    measured = "; ".join(f"{k}: worst layer {v['worst_layer']} cos {v['worst_cos']:.6f}, swaps at "
                         f"{v['layers_with_swaps']} layers ({100 * v['swap_share_mean']:.1f}% of tokens), "
                         f"{100 * v['top1_agree_share']:.1f}% same top token" for k, v in figs.items())
    return figs, measured, "measured"


_RULES = {"layers": _rule_layers, "routing": _rule_routing, "next_token": _rule_next_token,
          "nonfinite": _rule_nonfinite, "compounding": _rule_compounding, "measured": _rule_measured}


def _model_plots(cfg, summary) -> list:
    layers = list(range(summary["layers"]))
    pairs = summary["pairs"]
    return [{"title": "residual stream 1 − cos per layer (mean over prompts and tokens)", "kind": "lines",
             "x": layers, "xlabel": "layer", "ylabel": "1 − cos", "logy": True,
             "series": {k: v["one_minus_cos_mean"] for k, v in pairs.items()}},
            {"title": "share of tokens whose top-k expert set changed", "kind": "lines", "x": layers,
             "xlabel": "layer", "ylabel": "share of tokens",
             "series": {k: v["swap_share"] for k, v in pairs.items()}}]


def model_matvec(cfg, ctx: Context) -> dict:
    """matvec_grid on a slice of a model tensor (cfg.weight a glob, cfg.weight_format an optional
    format filter), plus the storage format of every tensor matching cfg.list_formats."""
    import fnmatch
    model = model_of(cfg)
    name, w = model_tensor(cfg.size, cfg.seed, cfg.weight, cfg.get("expert", 0), cfg.get("weight_format", ""),
                           cfg.get("model", ""))
    result = matvec_grid(cfg, ctx, weight=w)
    result["figures"]["tensor"] = name
    result["measured"] = f"{name}: {result['measured']}"
    listing = {n: f for n, f in model.formats().items() if fnmatch.fnmatchcase(n, cfg.get("list_formats", ""))}
    if listing:
        by_fmt = {}
        for n, f in listing.items():
            by_fmt.setdefault(f, []).append(n)
        result["figures"]["formats"] = by_fmt
        result["measured"] += "; " + ", ".join(f"{f}: {len(v)} ({', '.join(v[:6])}{'…' if len(v) > 6 else ''})"
                                               for f, v in by_fmt.items())
    return result


# ---------------------------------------------------------------------------------------------
# Monte Carlo arithmetic (numlab.analysis.mca).

def _mca_plots(x, xlabel, by_bits: dict, with_topk: bool) -> list:
    plots = [{"title": "significant bits s = −log2(σ/|μ|) (median over elements)", "kind": "lines", "x": x,
              "xlabel": xlabel, "ylabel": "bits", "series": {f"t={b}": v["median"] for b, v in by_bits.items()},
              "hlines": [(b, f"t={b}") for b in by_bits]}]
    if with_topk:
        plots.append({"title": "P(top-k expert set changes)", "kind": "lines", "x": x, "xlabel": xlabel,
                      "ylabel": "probability", "series": {f"t={b}": v["p_topk_change"] for b, v in by_bits.items()}})
    return plots


def mca_chain(cfg, ctx: Context) -> dict:
    """MCA on a chain of cfg.n_max float64 matvecs (random cfg.weight_format matrices, dequantized) with
    L2 normalisation between, every output perturbed at each virtual precision of cfg.bits;
    cfg.n_samples keys in chunks. Significant bits after each step."""
    from numlab.analysis import mca
    d = cfg.rows or matrix_dims(cfg.size, "square")[0]
    key_w, key_x, key_s = jax.random.split(jax.random.key(cfg.seed), 3)
    ws = take(random_weights(key_w, 1, (cfg.n_max, d, d), cfg.weight_format), 0).dequantize().astype(jnp.float64)
    x = family_input(key_x, family_index(cfg.family), d)
    keys = jax.random.split(key_s, cfg.n_samples)
    by_bits = {}
    run = jax.jit(mca.chain)
    for bits in ctx.progress(list(cfg.bits), desc="bits"):
        exact = run(ws, x, keys[:1], float(bits))[1]
        res = map_chunked(lambda k, bits=bits: {"diff": run(ws, x, k, float(bits))[0] - exact}, (keys,), cfg.chunk,
                          ctx.store(f"mca-chain-{bits}"), lambda it: ctx.progress(it, desc=f"t={bits} samples"))
        by_bits[bits] = {k: v.tolist() for k, v in mca.layer_bits(res["diff"], exact).items()}
    steps = list(range(1, cfg.n_max + 1))
    loss = {b: float(b - v["median"][-1]) for b, v in by_bits.items()}
    measured = "; ".join(f"t={b}: s {v['median'][0]:.1f} bits after 1 matvec, {v['median'][-1]:.1f} after "
                         f"{cfg.n_max}" for b, v in by_bits.items())
    return {"figures": {"bits_lost_over_chain": loss}, "measured": measured, "verdict": "measured",
            "data": {"d": d, "steps": steps, "by_bits": by_bits}, "plots": _mca_plots(steps, "chain length N",
                                                                                     by_bits, False)}


@functools.cache
def _mca_runner(policy_text: str):
    from numlab.models.qwen3_moe import forward

    def one(model, tokens, mix, key, bits):
        tr = forward(model, tokens, policy_text, ref=policy_text, mix=mix, noise=(key, bits))
        return {"resid": tr.resid, "topk_idx": tr.topk_idx}
    per_prompt = jax.vmap(one, in_axes=(None, 0, None, None, None))
    return jax.jit(jax.vmap(per_prompt, in_axes=(None, None, None, 0, None)))


def site_mask(config, globs) -> np.ndarray:
    """float [n_sites] (sites.site_kinds order): 1 at sites matching any of `globs`, else 0."""
    import fnmatch

    from numlab.models.sites import site_names
    names = site_names(config)
    mask = np.array([any(fnmatch.fnmatchcase(n, g) for g in globs) for n in names], np.float64)
    if not mask.any():
        raise ValueError(f"site globs {list(globs)} match no site; sites look like {names[0]}, {names[-1]}")
    return mask


def mca_model(cfg, ctx: Context) -> dict:
    """MCA on the model: the sites matching cfg.sites compute the cfg.ref policy's op and perturb its
    output at each virtual precision of cfg.bits (the forward's noise argument); cfg.n_samples keys in
    chunks, on cfg.n_prompts prompts. Per layer: significant bits of the residual stream and the
    probability that the top-k expert set changes."""
    from numlab.analysis import mca
    model = model_of(cfg)
    tokens = prompt_tokens(cfg.seed, cfg.n_prompts, cfg.n_tokens, model.config.vocab)
    exact = run_policy(model, tokens, cfg.ref)
    exact_resid = np.moveaxis(np.asarray(exact.resid, np.float64), 0, 1)            # [L, P, T, D]
    exact_topk = np.moveaxis(np.asarray(exact.topk_idx), 0, 1)                        # [L, P, T, k]
    mix = jnp.asarray(site_mask(model.config, cfg.sites))
    keys = jax.random.split(jax.random.key(cfg.seed + 1), cfg.n_samples)
    runner = _mca_runner(cfg.ref)
    by_bits = {}
    for bits in ctx.progress(list(cfg.bits), desc="bits"):
        def batch(k, bits=bits):
            out = runner(model, tokens, mix, k, jnp.asarray(float(bits)))
            return {"diff": (out["resid"] - exact.resid[None]).astype(jnp.float32), "topk": out["topk_idx"]}
        res = map_chunked(batch, (keys,), cfg.chunk, ctx.store(f"mca-{bits}"),
                          lambda it, bits=bits: ctx.progress(it, desc=f"t={bits} samples"))
        diff = np.moveaxis(res["diff"], 1, 2)                                             # [K, L, P, T, D]
        stats = mca.layer_bits(diff, exact_resid)
        n_layers, k = model.config.n_layers, exact_topk.shape[-1]
        topk = np.moveaxis(res["topk"], 1, 2).reshape(cfg.n_samples, n_layers, -1, k)
        p_change = mca.topk_change_probability(topk, exact_topk.reshape(n_layers, -1, k))
        by_bits[bits] = {"median": stats["median"].tolist(), "normwise": stats["normwise"].tolist(),
                         "p_topk_change": p_change.tolist()}
    layers = list(range(model.config.n_layers))
    figures = {f"t={b}": {"bits_last_layer": v["median"][-1], "bits_min": min(v["median"]),
                          "p_topk_change_max": max(v["p_topk_change"]),
                          "first_layer_p_change_gt_0": next((i for i, p in enumerate(v["p_topk_change"]) if p > 0),
                                                            None)}
               for b, v in by_bits.items()}
    measured = "; ".join(f"{b}: last layer s {f['bits_last_layer']:.1f} bits, max P(top-k change) "
                         f"{f['p_topk_change_max']:.3f}" for b, f in figures.items())
    return {"figures": figures, "measured": measured, "verdict": "measured",
            "data": {"sites": list(cfg.sites), "ref": cfg.ref, "layers": layers, "by_bits": by_bits},
            "plots": _mca_plots(layers, "layer", by_bits, True)}


# ---------------------------------------------------------------------------------------------
# Configs, running, writing.

def compare_orders_with_q8_k(cfg):
    """Set cfg to weigh the f32 summation orders (candidate) against Q8_K-vs-f32 (baseline) by rel L2."""
    cfg.paths = ["f32", "f32.order=pairwise", "f32.order=sequential", "q8_k", "q8_1"]
    cfg.ref = "f64"
    cfg.candidate = ["f32.order=sequential", "f32.order=pairwise"]
    cfg.baseline = ["q8_k", "f32"]
    cfg.metric = "rel_l2"
    return cfg


def base_config(name: str, experiment: str, size: str = "tiny", *, hypothesis: str = "",
                reported: str = "", their_verdict: str = "", chunk: int = 8):
    """The fields every sweep config has: name, experiment (a key of EXPERIMENTS), size (tiny for
    CI, qwen3-30b-a3b for the GPU run), seed, chunk (points per vmapped call), and the CASCADE.md
    row it re-asks (hypothesis, reported figure, their verdict)."""
    import ml_collections
    return ml_collections.ConfigDict(dict(name=name, experiment=experiment, size=size, seed=0, chunk=chunk,
                                          hypothesis=hypothesis, reported=reported,
                                          their_verdict=their_verdict))


def model_runs_config(name: str, size: str = "tiny", **row):
    """base_config of a "model_runs" experiment with its shared defaults: 4 prompts of 8 tokens (tiny) or
    32 (full size), 4 points per vmapped call, and layer 0's attn_q captured (it sees identical inputs
    under every policy: the per-matvec difference). `row`: hypothesis, reported, their_verdict."""
    cfg = base_config(name, "model_runs", size, chunk=4, **row)
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.capture = ["attn_q"]
    return cfg


def run(cfg, ctx: Context | None = None) -> dict:
    """Run the experiment cfg.experiment; its result with the config's identity and wall time."""
    import time
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {cfg.experiment!r}; valid: {', '.join(EXPERIMENTS)}")
    t0 = time.perf_counter()
    result = EXPERIMENTS[cfg.experiment](cfg, ctx or Context())
    return {"name": cfg.name, "experiment": cfg.experiment, "size": cfg.size,
            "hypothesis": cfg.hypothesis, "reported": cfg.reported, "their_verdict": cfg.their_verdict,
            "measured": result["measured"], "verdict": result["verdict"], "figures": result["figures"],
            "wall_s": time.perf_counter() - t0, "backend": jax.default_backend(),
            "config": cfg.to_dict(), "data": result["data"], "plots": result["plots"]}


def render(plots: list):
    """A matplotlib figure (Agg) with one panel per plot spec: lines or grouped bars of named series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(plots), figsize=(8.5 * len(plots), 4.5), squeeze=False)
    for ax, spec in zip(axes[0], plots):
        x = list(spec["x"])
        series = {k: np.asarray(v, np.float64).reshape(-1) for k, v in spec["series"].items()}
        if spec.get("kind") == "bars":
            width = 0.8 / max(len(series), 1)
            for j, (label, v) in enumerate(series.items()):
                ax.bar(np.arange(len(x)) + (j - (len(series) - 1) / 2) * width, _positive(v, spec), width,
                       label=label)
            ax.set_xticks(np.arange(len(x)), [str(v) for v in x])
        else:
            for label, v in series.items():
                ax.plot(x, _positive(v, spec), marker="o", ms=3, label=label)
            if spec.get("logx"):
                ax.set_xscale("log")
        for y, label in spec.get("hlines", ()):
            ax.axhline(y, color="grey", ls="--", lw=1)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.set(title=spec["title"], xlabel=spec.get("xlabel", ""), ylabel=spec.get("ylabel", ""))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _positive(v, spec):
    """On a log axis, zeros (exact agreement) are left out rather than breaking the scale."""
    return np.where(v > 0, v, np.nan) if spec.get("logy") else v


def write(result: dict, folder) -> tuple:
    """The result as folder/<name>.json and its plot as folder/<name>.png (atomic writes)."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from numlab.io import atomic_savefig, atomic_write_json
    folder = Path(folder)
    js = atomic_write_json(folder / f"{result['name']}.json", result)
    fig = render(result["plots"])
    try:
        png = atomic_savefig(fig, folder / f"{result['name']}.png", dpi=110)
    finally:
        plt.close(fig)
    return js, png


def run_to_folder(cfg, folder, *, overwrite: bool = False, resume: bool = True, progress=None) -> dict:
    """Run cfg and write folder/<name>.json and .png. Refuses to replace an existing result unless
    overwrite. With resume, finished chunks live in folder/.chunks/<name>-<config hash>/ (removed
    once the result is written), so an interrupted run picks up where it stopped."""
    import hashlib
    import json
    import shutil
    from pathlib import Path
    folder = Path(folder)
    if (folder / f"{cfg.name}.json").exists() and not overwrite:
        raise FileExistsError(f"{folder / (cfg.name + '.json')} exists; pass overwrite (--overwrite) to replace it")
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    chunks = folder / ".chunks" / f"{cfg.name}-{digest}"
    ctx = Context(store=(lambda name: ChunkStore(chunks / name)) if resume else (lambda name: None),
                  progress=progress or Context.progress)
    result = run(cfg, ctx)
    write(result, folder)
    if chunks.exists():
        shutil.rmtree(chunks)
        if not any((folder / ".chunks").iterdir()):
            (folder / ".chunks").rmdir()
    return result


EXPERIMENTS = {"matvec_grid": matvec_grid, "chain": chain, "silu": silu_sweep, "model_runs": model_runs,
               "model_matvec": model_matvec, "mca_chain": mca_chain, "mca_model": mca_model}
