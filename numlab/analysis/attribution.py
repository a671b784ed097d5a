"""Attribution of a divergence to op sites through the per-site mix m (DESIGN.md: "precision as a
differentiable knob"): m = 0 is the reference run, m = 1 the low-precision run, and any function
f(m) -> pytree of arrays (a metric of the mixed run) is swept, differentiated and integrated here.

Groups of sites are rows of a 0/1 matrix G [n_groups, n_sites] (a partition of the sites), so every
method is one vmap over G. Numbers are in the dtype f returns (float64 under jax_enable_x64).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from numlab import policy as policy_lib
from numlab.analysis import metrics
from numlab.models.qwen3_moe import forward
from numlab.models.sites import site_kinds

GROUPINGS = ("kind", "layer", "site")
RULES = ("gauss", "midpoint")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True, eq=False)
class Groups:
    """Named groups of sites: matrix[g, i] = 1 when site i (mix order) belongs to group g."""

    names: tuple
    matrix: np.ndarray
    sites: tuple

    def members(self, g: int) -> tuple:
        """Site names of group g, in mix order."""
        return tuple(s for s, x in zip(self.sites, self.matrix[g]) if x)


def group_key(site: str, by: str) -> str:
    """Group of one site: by 'kind' the op name across layers (blk.3.attn_q -> attn_q), by 'layer'
    the block (blk.3; global sites keep their name), by 'site' the site itself."""
    m = _LAYER.match(site)
    if by == "kind":
        return m.group(2) if m else site
    if by == "layer":
        return f"blk.{m.group(1)}" if m else site
    if by == "site":
        return site
    raise ValueError(f"unknown grouping {by!r}; valid: {', '.join(GROUPINGS)}")


def group_sites(sites, by: str) -> Groups:
    """Partition of the sites (names in mix order) into groups named by group_key, in first-seen order."""
    sites = tuple(sites)
    keys = [group_key(s, by) for s in sites]
    names = tuple(dict.fromkeys(keys))
    index = {n: g for g, n in enumerate(names)}
    matrix = np.zeros((len(names), len(sites)))
    matrix[[index[k] for k in keys], np.arange(len(sites))] = 1.0
    return Groups(names, matrix, sites)


def sweep(f, masks, batch_size=None):
    """f(m) for every row m of masks, stacked on a leading axis (vmap, or lax.map in batches of
    batch_size rows to bound memory)."""
    masks = jnp.asarray(masks)
    if batch_size is None or batch_size >= masks.shape[0]:
        return jax.vmap(f)(masks)
    return jax.lax.map(f, masks, batch_size=batch_size)


def ablation(f, G, batch_size=None):
    """One group at a time: f(m = G[g]) (only group g low), stacked over groups."""
    return sweep(f, G, batch_size)


def leave_one_out(f, G, batch_size=None):
    """All low but one group: f(m = 1 - G[g]), stacked over groups."""
    return sweep(f, 1 - jnp.asarray(G), batch_size)


def directional(f, m, G):
    """(f(m), D) with D[g] = d f / d m along G[g] (= sum over g's sites of d f / d m_i): forward mode,
    jax.jvp vmapped over the groups (the primal, independent of the tangent, is computed once)."""
    G = jnp.asarray(G)
    m = jnp.asarray(m, G.dtype)
    return jax.vmap(lambda v: jax.jvp(f, (m,), (v,)), out_axes=(None, 0))(G)


def first_order(f, m, G):
    """First-order attribution d f / d m_g at m, stacked over groups (the ADAPT-style <adjoint, e_g>).
    Zero at m = 0 for metrics quadratic there (1 - cos, KL): use integrated_gradients for those."""
    return directional(f, m, G)[1]


def quadrature(n: int, rule: str = "gauss"):
    """(t[n], w[n]) nodes and weights on [0, 1]: Gauss-Legendre (exact for polynomials of degree
    2n - 1) or the midpoint rule. numpy float64."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"quadrature needs n >= 1 points, got {n!r}")
    if rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(int(n))
        return (x + 1) / 2, w / 2
    if rule == "midpoint":
        return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    raise ValueError(f"unknown quadrature rule {rule!r}; valid: {', '.join(RULES)}")


def path_derivatives(f, G, ts, args=(), reduce=None, progress=None) -> list:
    """[(f(t·1, *args), D(t)) for t in ts], D[g] = d f / d m along G[g] (directional). One jit compile
    serves every t (args are traced, not baked in); reduce(out, D, *args) -> anything, if given, is
    applied inside the compiled function (to keep large tangents on the device). numpy results;
    `progress` wraps the iterable of nodes (e.g. tqdm)."""
    G = jnp.asarray(G)
    wrap = progress or (lambda it: it)
    return [jax.tree.map(np.asarray, _path_node(jnp.asarray(t, G.dtype), G, tuple(args), f=f, reduce=reduce))
            for t in wrap(list(ts))]


@functools.partial(jax.jit, static_argnames=("f", "reduce"))
def _path_node(t, G, args, *, f, reduce):
    """One node of path_derivatives (compiled once per f, reduce and shapes)."""
    out, d = directional(lambda m: f(m, *args), t * jnp.ones(G.shape[1], G.dtype), G)
    return (out, d) if reduce is None else reduce(out, d, *args)


def weighted_sum(trees, weights):
    """sum_j weights[j] · trees[j], leaf by leaf (a quadrature over path nodes). numpy float64."""
    return jax.tree.map(lambda *xs: np.tensordot(np.asarray(weights, np.float64),
                                                 np.stack([np.asarray(x, np.float64) for x in xs]), axes=1), *trees)


def integrated_gradients(f, G, n_points: int = 8, rule: str = "gauss", args=(), progress=None):
    """Integrated gradients along the straight path m = t·1, t from 0 to 1, per group:
    IG[g] = ∫ d f(t·1, *args) / d m_g dt by the quadrature rule, stacked over groups. If G partitions
    the sites, sum_g IG[g] = f(1) - f(0) up to the quadrature error and f's jumps (see closure)."""
    t, w = quadrature(n_points, rule)
    return weighted_sum([d for _, d in path_derivatives(f, G, t, args, progress=progress)], w)


def closure(ig, f0, f1) -> dict:
    """Sum of the group attributions against the actual change f1 - f0 (arrays broadcast, groups on
    ig's axis 0): {"change", "attributed", "gap" = change - attributed, "rel_gap" = |gap| / |change|
    (nan where change is 0)}. numpy float64."""
    change = np.asarray(f1, np.float64) - np.asarray(f0, np.float64)
    attributed = np.sum(np.asarray(ig, np.float64), axis=0)
    gap = change - attributed
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(change != 0, np.abs(gap) / np.abs(change), np.nan)
    return {"change": change, "attributed": attributed, "gap": gap, "rel_gap": rel}


def shares(values, axis: int = 0):
    """values / their sum along axis (the share of each group in a total); nan where the sum is 0."""
    v = np.asarray(values, np.float64)
    s = np.sum(v, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s != 0, v / s, np.nan)


def linear_cosine_drop(a0, deltas):
    """Linear error propagation for 1 - cos: with first-order changes deltas[g] = J_g e_g of the
    vector a0 (last axis) per group, 1 - cos(a0 + δ, a0) ≈ |P δ|^2 / (2 |a0|^2) for δ = sum_g δ_g and
    P the projection orthogonal to a0; returns the exact split of that quadratic form,
    c[g] = <P δ_g, P δ> / (2 |a0|^2), shape deltas.shape[:-1] (sum over g = the estimate)."""
    a0 = jnp.asarray(a0)
    deltas = jnp.asarray(deltas)
    nrm2 = jnp.sum(a0 * a0, axis=-1, keepdims=True)
    u = a0 / jnp.sqrt(jnp.where(nrm2 > 0, nrm2, 1))
    perp = deltas - jnp.sum(deltas * u, axis=-1, keepdims=True) * u
    total = jnp.sum(perp, axis=0)
    return jnp.sum(perp * total, axis=-1) / (2 * jnp.where(nrm2[..., 0] > 0, nrm2[..., 0], jnp.inf))


# ---------------------------------------------------------------- the model: two policies, attributed


def _traces(model, tokens, mix_rows, force, low, ref):
    """Mixed runs of every prompt tokens [P, T] for each row of mix_rows [R, n_sites]: a Trace with
    leading axes [R, P] (force: expert choices [P, L, T, k] replayed, or None for free routing)."""
    def one(m):
        if force is None:
            return jax.vmap(lambda tk: forward(model, tk, low, ref=ref, mix=m))(tokens)
        return jax.vmap(lambda tk, fe: forward(model, tk, low, ref=ref, mix=m, force_experts=fe))(tokens, force)
    return jax.vmap(one)(mix_rows)


@functools.partial(jax.jit, static_argnames=("low", "ref"))
def _rows(model, tokens, mix_rows, *, low, ref):
    """Free-routing mixed runs for a batch of mix rows (the sweep's one compiled function)."""
    tr = _traces(model, tokens, mix_rows, None, low, ref)
    return dict(resid=tr.resid, logits=tr.logits, router_logits=tr.router_logits, topk_idx=tr.topk_idx)


@jax.jit
def _row_summary(rows, r0):
    """Per mix row, against the reference r0 (row m = 0): mean and max over prompts and tokens of
    1 - cos per layer [R, L], swaps per layer summed over prompts and tokens [R, L], mean router margin
    of the reference's expert sets per layer [R, L], mean KLD of the final logits [R], share of
    positions with the same top token [R], last-position agreement [R, P]."""
    omc = metrics.one_minus_cos(rows["resid"], r0["resid"])
    idx0 = jnp.broadcast_to(r0["topk_idx"], rows["topk_idx"].shape)
    return dict(omc=omc.mean(axis=(1, 3)), omc_max=omc.max(axis=(1, 3)),
                swaps=metrics.swaps(idx0, rows["topk_idx"]).sum(axis=(1, 3)),
                margin=metrics.set_margin(rows["router_logits"], idx0).mean(axis=(1, 3)),
                kld=metrics.kld(r0["logits"], rows["logits"]).mean(axis=(1, 2)),
                same_top=metrics.argmax_agree(r0["logits"], rows["logits"]).mean(axis=(1, 2)),
                last_agree=metrics.argmax_agree(r0["logits"][:, -1], rows["logits"][:, :, -1]))


@functools.lru_cache(maxsize=16)
def _targets_of(low, ref):
    """_targets for the policy pair, one function object per pair (so its gradient compiles once)."""
    return lambda m, model, tokens, r0: _targets(m, model, tokens, r0, low, ref)


def _targets(m, model, tokens, r0, low, ref):
    """What is attributed, at mix m with the reference's expert choices r0["topk_idx"] forced: 1 - cos
    per layer [L] and mean KLD against the reference r0, the reference set's router margin
    [P, L, T]; the residual stream [P, L, T, D] (for linear propagation); and, as a check, the number
    of experts the forced run swapped (0 by construction)."""
    tr = _traces(model, tokens, m[None], r0["topk_idx"], low, ref)
    resid = tr.resid[0]
    swapped = metrics.swaps(r0["topk_idx"], tr.topk_idx[0]).sum().astype(m.dtype)
    return dict(omc=metrics.one_minus_cos(resid, r0["resid"]).mean(axis=(0, 2)),
                kld=metrics.kld(r0["logits"], tr.logits[0]).mean(),
                margin=metrics.set_margin(tr.router_logits[0], r0["topk_idx"]), resid=resid,
                swaps=lax.stop_gradient(swapped))


def _linear_split(out, d, model, tokens, r0):
    """Drop the residual stream and its tangents, keeping their linear-propagation split of 1 - cos
    per group and layer [n_groups, L] (meaningful at m = 0)."""
    out, d = dict(out), dict(d)
    out.pop("resid")
    lin = linear_cosine_drop(r0["resid"], d.pop("resid")).mean(axis=(1, 3))
    return out, d, lin


def describe_groups(groups: Groups, kinds: dict, low, ref, formats: dict | None = None) -> dict:
    """{group: what differs between the policies at its sites}, e.g. "matvec act f32→q8_k"; sites
    differing in several ways are joined with " + ", groups mixing several differences with " | ";
    "same precision" where nothing differs. `formats` ({matvec site: weight format}) lets the
    policies' `@<format>` rules apply."""
    lo, hi = policy_lib.get(low).resolve(kinds, formats), policy_lib.get(ref).resolve(kinds, formats)
    out = {}
    for g, name in enumerate(groups.names):
        diffs = []
        for s in groups.members(g):
            d = " + ".join(f"{f} {hi[s][f]}→{lo[s][f]}" for f in hi[s] if hi[s][f] != lo[s][f])
            diffs.append(f"{kinds[s]} {d}" if d else "")
        uniq = [d for d in dict.fromkeys(diffs) if d]
        out[name] = " | ".join(uniq) if uniq else "same precision"
    return out


def analyze(model, tokens, low, ref, *, by: str = "kind", ig_points: int = 8, rule: str = "gauss",
            batch_size=None, progress=None) -> dict:
    """Divergence of policy `low` from `ref` on prompts tokens int [P, T], attributed to site groups.

    Runs (all analysis runs, each site r + m·(l - r) in ref's dtype): reference m = 0, low m = 1, the
    one-group ablations m = G[g] and leave-one-outs m = 1 - G[g] (free routing, vmapped over rows in
    batches of batch_size); then, with the reference's expert choices forced, integrated gradients
    along m = t·1 at the quadrature nodes, the first-order derivative at m = 1 and the linear error
    propagation at m = 0. `progress` wraps iterables of steps (e.g. tqdm). Returns numpy arrays and
    metadata (report.build turns them into the report)."""
    low, ref = policy_lib.get(low), policy_lib.get(ref)
    wrap = progress or (lambda it, **kw: it)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [prompts, T] with T >= 2, got shape {tokens.shape}")
    cfg = model.config
    kinds = site_kinds(cfg)
    formats = {n: f for n, f in model.formats().items() if kinds.get(n) == "matvec"}
    groups = group_sites(tuple(kinds), by)
    G = jnp.asarray(groups.matrix)
    n_g, n_s = G.shape
    rows = jnp.concatenate([jnp.zeros((1, n_s)), jnp.ones((1, n_s)), G, 1 - G])
    size = rows.shape[0] if batch_size is None else int(batch_size)
    if size < 2:
        raise ValueError(f"batch_size must be >= 2 (rows m = 0 and m = 1 share the first batch), got {batch_size}")
    batches = [rows[s:s + size] for s in range(0, rows.shape[0], size)]
    summaries, r0, r1 = [], None, None
    for b in wrap(batches, desc="runs: reference, low, ablation, leave-one-out", unit="batch"):
        n = b.shape[0]
        out = _rows(model, tokens, jnp.pad(b, ((0, size - n), (0, 0))), low=low, ref=ref)
        if r0 is None:
            r0 = jax.tree.map(lambda a: a[0], out)
            r1 = jax.tree.map(lambda a: np.asarray(a[1]), out)
        summaries.append(jax.tree.map(lambda a: np.asarray(a[:n]), _row_summary(out, r0)))
    summ = jax.tree.map(lambda *a: np.concatenate(a), *summaries)

    t, w = quadrature(ig_points, rule)
    nodes = path_derivatives(
        _targets_of(low, ref), G, list(t) + [1.0, 0.0], args=(model, tokens, r0),
        reduce=_linear_split, progress=lambda it: wrap(it, desc=f"gradients: {ig_points} path nodes, m = 1, m = 0",
                                                       unit="node"))
    ig = weighted_sum([d for _, d, _ in nodes[:ig_points]], w)
    (forced, first, _), (_, zero, lin) = nodes[ig_points], nodes[ig_points + 1]

    r0 = jax.tree.map(np.asarray, r0)
    tok = np.asarray(tokens)
    return dict(
        meta=dict(low=str(low), ref=str(ref), by=by, ig_points=ig_points, rule=rule,
                  n_prompts=int(tok.shape[0]), n_tokens=int(tok.shape[1]), n_layers=cfg.n_layers,
                  n_experts=cfg.n_experts, k=cfg.n_experts_used, n_sites=n_s,
                  config=dataclasses.asdict(cfg)),
        groups=groups, causes=describe_groups(groups, kinds, low, ref, formats), tokens=tok,
        ref=r0, low=r1,
        ref_summary=jax.tree.map(lambda a: a[0], summ), low_summary=jax.tree.map(lambda a: a[1], summ),
        ablation=jax.tree.map(lambda a: a[2:2 + n_g], summ),
        leave_one_out=jax.tree.map(lambda a: a[2 + n_g:], summ),
        forced=forced, ig=ig, first_order=first, linear=dict(omc=lin), zero_grad=zero,
    )


def policy_divergence(model, tokens, low, ref) -> dict:
    """1 - cos per layer [L] (mean over prompts and tokens), experts swapped per layer [L] and mean
    KLD of `low` against `ref` (analysis runs at m = 1 and m = 0), for comparing further policies."""
    low, ref = policy_lib.get(low), policy_lib.get(ref)
    n_s = len(site_kinds(model.config))
    rows = jnp.stack([jnp.zeros(n_s), jnp.ones(n_s)])
    out = _rows(model, jnp.asarray(tokens, jnp.int32), rows, low=low, ref=ref)
    s = _row_summary(out, jax.tree.map(lambda a: a[0], out))
    return dict(policy=str(low), one_minus_cos=np.asarray(s["omc"][1]), swaps=np.asarray(s["swaps"][1]),
                kld=float(s["kld"][1]))
