"""Qwen3-MoE causal prefill under a precision Policy, every op through a named site.

Plain run (`ref=None`): each site runs the policy's op. Analysis run (`ref` a Policy, `mix` a vector
over sites in `site_kinds` order): each site computes the reference op r and the low op l (the
policy's) on the same input and passes on `r + mix[i] · stop_gradient(l − r)` in r's dtype, so the
derivative is r's (straight-through) and d/d mix[i] is the local error l − r. The top-k expert choice
is a step (no gradient through the choice); `force_experts` replays given choices. With
`noise=(key, bits)` (Monte Carlo arithmetic) the low op's output is perturbed before mixing:
l·(1 + 2^-bits·u), u ~ U(-1, 1) per element, keyed by the site's mix index.

Layers run under `lax.scan`. Layers whose weight formats and resolved site precisions (low and ref)
agree form a *variant*; each variant's weights are stacked, and the scan body switches on the layer's
variant (`lax.switch`, one traced branch per variant), so compile time grows with the number of
variants, not with depth. Expert sites hold the chosen (token, expert) pairs only, [T, k, ...] in
top-k order (numlab.ops.expert_qmatvec: grouped by expert on a GPU).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import numlab.formats as formats
from numlab import policy as policy_lib
from numlab.formats import QTensor
from numlab.models import config as config_lib
from numlab.models.sites import GLOBAL_KINDS, LAYER_KINDS, LAYER_SITES, site_kinds
from numlab.ops import (attention, expert_qmatvec, jdtype, moe_sum, qmatvec, rmsnorm, rope, router_margin, rsum,
                        softmax, swiglu, topk_route)
from numlab.ops.precision import perturb



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
    """Weights by GGUF tensor name without ".weight" (config.tensor_shapes): matrices and expert
    stacks as QTensor (the F32 router too, as an f32 QTensor), norm weights as float32 arrays [d]."""

    tensors: dict
    config: config_lib.Qwen3MoeConfig = dataclasses.field(metadata=dict(static=True))

    def formats(self) -> dict:
        """{tensor name: storage format} ("f32" for the norm vectors)."""
        return {n: t.fmt if isinstance(t, QTensor) else "f32" for n, t in self.tensors.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trace:
    """What a forward pass returns (L layers, T tokens, E experts, k chosen, V vocabulary).

    logits [T, V]; resid [L, T, D] residual stream after each layer; router_logits [L, T, E];
    topk_idx int32 [L, T, k]; topk_w [L, T, k] (renormalised); margin [L, T] (k-th minus (k+1)-th
    router logit); sites {name: output} for the captured sites (per-layer ones stacked [L, ...]).
    """

    logits: jax.Array
    resid: jax.Array
    router_logits: jax.Array
    topk_idx: jax.Array
    topk_w: jax.Array
    margin: jax.Array
    sites: dict


def check_model(model: Model) -> None:
    """ValueError unless model holds exactly config.tensor_shapes' tensors with those shapes."""
    want = config_lib.tensor_shapes(model.config)
    if set(want) != set(model.tensors):
        missing, extra = sorted(set(want) - set(model.tensors)), sorted(set(model.tensors) - set(want))
        raise ValueError(f"model tensors do not match its config: missing {missing[:8]}, unexpected {extra[:8]}")
    for name, shape in want.items():
        t = model.tensors[name]
        got = tuple(t.data.shape[:-2]) + tuple(t.shape) if isinstance(t, QTensor) else tuple(t.shape)
        if got != shape:
            raise ValueError(f"tensor {name!r} has shape {got}, expected {shape}")


def forward(model: Model, tokens, policy, *, ref=None, mix=None, force_experts=None, capture=(),
            noise=None) -> Trace:
    """Causal prefill of tokens int [T] under `policy` (Policy, preset name or rule text); with `ref`
    and `mix` float [n_sites] an analysis run (module docstring). force_experts int [L, T, k] replaces
    the top-k choice. capture: site names (per-layer ones without the blk.{i}. prefix, or "*" for
    all) whose outputs the Trace keeps. noise: (PRNG key, bits) perturbs the low ops (analysis runs)."""
    cfg = model.config
    policy = policy_lib.get(policy)
    ref = None if ref is None else policy_lib.get(ref)
    if (ref is None) != (mix is None):
        raise ValueError("an analysis run needs both ref (a Policy) and mix (float [n_sites]); a plain run neither")
    if noise is not None and ref is None:
        raise ValueError("noise=(key, bits) perturbs the low ops of an analysis run: give ref and mix too")
    n_sites = len(site_kinds(cfg))
    if mix is not None and jnp.shape(mix) != (n_sites,):
        raise ValueError(f"mix must have shape ({n_sites},) (one entry per site, sites.site_kinds order), "
                         f"got {jnp.shape(mix)}")
    t = jnp.shape(tokens)
    if len(t) != 1 or t[0] < 1 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"tokens must be a non-empty integer vector [T], got {jnp.result_type(tokens)} {t}")
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        if not (0 <= ids.min() and ids.max() < cfg.vocab):
            raise ValueError(f"token ids must lie in 0..{cfg.vocab - 1}, got {ids.min()}..{ids.max()}")
    if force_experts is not None:
        want = (cfg.n_layers, t[0], cfg.n_experts_used)
        if jnp.shape(force_experts) != want or not jnp.issubdtype(jnp.result_type(force_experts), jnp.integer):
            raise ValueError(f"force_experts must be integer {want} [layers, tokens, k], got "
                             f"{jnp.result_type(force_experts)} {jnp.shape(force_experts)}")
    fmts = tuple(sorted(model.formats().items()))
    for p in (policy, ref):
        if p is not None:
            _resolve(p, cfg, fmts)
    return _forward(model, jnp.asarray(tokens, jnp.int32), mix, force_experts, noise,
                    policy=policy, ref=ref, capture=_capture_names(capture))


@functools.lru_cache(maxsize=64)
def _resolve(policy, cfg, fmts: tuple) -> dict:
    """policy.resolve on the model's sites, with its matvec weight formats (fmts: sorted (name, fmt))."""
    kinds = site_kinds(cfg)
    return policy.resolve(kinds, {n: f for n, f in fmts if kinds.get(n) == "matvec"})


def _capture_names(capture) -> tuple:
    names = (capture,) if isinstance(capture, str) else tuple(capture)
    if "*" in names:
        return tuple(LAYER_KINDS) + tuple(GLOBAL_KINDS)
    valid = tuple(LAYER_KINDS) + tuple(GLOBAL_KINDS)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"cannot capture {bad}: capture takes per-layer site names without the blk.{{i}}. "
                         f"prefix, global site names, or '*'; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))


class _Sites:
    """Runs named sites: the low op alone (plain run) or ref and low mixed (analysis run). `first`: the
    mix index of the first site (noise keys fold in the site's mix index)."""

    def __init__(self, low, ref, mix, capture, noise=None, first=0):
        self.low, self.ref, self.mix, self.capture, self.noise, self.first = low, ref, mix, capture, noise, first
        self.index = {name: i for i, name in enumerate(low)}
        self.record = {}

    def __call__(self, name, op):
        """op(**fields) computes the site's output under the given precision fields. Where low and ref
        fields agree (and no noise) the local error is zero by definition: the op runs once (two copies
        of one op can round differently where the compiler fuses them differently)."""
        y = op(**self.low[name])
        if self.ref is not None:
            same = self.ref[name] == self.low[name]
            r = y if same else op(**self.ref[name])
            if self.noise is not None:
                key, bits = self.noise
                y = perturb(y, jax.random.fold_in(key, self.first + self.index[name]), bits)
            if self.noise is not None or not same:
                y = r + self.mix[self.index[name]].astype(r.dtype) * lax.stop_gradient(y.astype(r.dtype) - r)
        if name in self.capture:
            self.record[name] = y
        return y


def _add(a, b, dtype):
    dt = jdtype(dtype)
    return a.astype(dt) + b.astype(dt)


def _renormalised_sum(expert_out, probs, dtype, order):
    """moe_sum of the chosen experts with their probs renormalised to sum 1, all in `dtype`."""
    p = probs.astype(jdtype(dtype))
    return moe_sum(expert_out, p / rsum(p, axis=-1, order=order)[..., None], dtype, order)


def _layer(cfg, w, x, forced, site):
    """One decoder layer on the residual stream x [T, D]: attention block, then the MoE block."""
    t, hq, hkv, dh, k, eps = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts_used, cfg.rms_eps
    h = site("attn_norm", lambda **p: rmsnorm(x, w["attn_norm"], eps, **p))
    q = site("attn_q", lambda **p: qmatvec(w["attn_q"], h, **p)).reshape(t, hq, dh)
    kk = site("attn_k", lambda **p: qmatvec(w["attn_k"], h, **p)).reshape(t, hkv, dh)
    v = site("attn_v", lambda **p: qmatvec(w["attn_v"], h, **p)).reshape(t, hkv, dh)
    q = site("attn_q_norm", lambda **p: rmsnorm(q, w["attn_q_norm"], eps, **p))
    kk = site("attn_k_norm", lambda **p: rmsnorm(kk, w["attn_k_norm"], eps, **p))
    qk = site("rope", lambda **p: rope(jnp.concatenate([q, kk], axis=1), jnp.arange(t), cfg.rope_theta, **p))
    a = site("attn", lambda **p: attention(qk[:, :hq], qk[:, hq:], v, **p)).reshape(t, hq * dh)
    o = site("attn_output", lambda **p: qmatvec(w["attn_output"], a, **p))
    x = site("attn_add", lambda **p: _add(x, o, **p))

    h = site("ffn_norm", lambda **p: rmsnorm(x, w["ffn_norm"], eps, **p))
    logits = site("ffn_gate_inp", lambda **p: qmatvec(w["ffn_gate_inp"], h, **p))
    probs = site("router_softmax", lambda **p: softmax(logits, **p))
    idx, topk_w = topk_route(probs, k, forced)
    g = site("ffn_gate_exps", lambda **p: expert_qmatvec(w["ffn_gate_exps"], h, idx, **p))
    u = site("ffn_up_exps", lambda **p: expert_qmatvec(w["ffn_up_exps"], h, idx, **p))
    s = site("silu", lambda **p: swiglu(g, u, **p))
    d = site("ffn_down_exps", lambda **p: expert_qmatvec(w["ffn_down_exps"], s, idx, **p))
    moe = site("moe_sum", lambda **p: _renormalised_sum(d, jnp.take_along_axis(probs, idx, axis=1), **p))
    x = site("ffn_add", lambda **p: _add(x, moe, **p))
    outs = dict(router_logits=logits, topk_idx=idx, topk_w=topk_w, margin=router_margin(logits, k))
    return x, outs


def _freeze(fields: dict) -> tuple:
    return tuple(sorted(fields.items()))


def _variants(cfg, fmts, low, ref):
    """Group layers by (weight formats, low fields, ref fields): (variant id [L], index in variant [L],
    layers of each variant)."""
    keys = []
    for i in range(cfg.n_layers):
        keys.append((tuple(fmts[f"blk.{i}.{n}"] for n in config_lib.LAYER_TENSORS),
                     tuple(_freeze(low[f"blk.{i}.{s}"]) for s, _ in LAYER_SITES),
                     None if ref is None else tuple(_freeze(ref[f"blk.{i}.{s}"]) for s, _ in LAYER_SITES)))
    order = list(dict.fromkeys(keys))
    vid = [order.index(key) for key in keys]
    members = [[i for i in range(cfg.n_layers) if vid[i] == v] for v in range(len(order))]
    pos = [members[vid[i]].index(i) for i in range(cfg.n_layers)]
    return np.array(vid, np.int32), np.array(pos, np.int32), members


def _stack(tensors):
    if isinstance(tensors[0], QTensor):
        return QTensor(jnp.stack([jnp.asarray(t.data) for t in tensors]), tensors[0].fmt, tensors[0].shape)
    return jnp.stack([jnp.asarray(t) for t in tensors])


@functools.partial(jax.jit, static_argnames=("policy", "ref", "capture"))
def _forward(model, tokens, mix, force_experts, noise, *, policy, ref, capture):
    cfg = model.config
    fmts = model.formats()
    low = _resolve(policy, cfg, tuple(sorted(fmts.items())))
    hi = None if ref is None else _resolve(ref, cfg, tuple(sorted(fmts.items())))
    governing = low if hi is None else hi
    carry = jnp.result_type(*[jdtype(governing[f"blk.{i}.{s}"]["dtype"])
                              for i in range(cfg.n_layers) for s in ("attn_add", "ffn_add")])
    vid, pos, members = _variants(cfg, fmts, low, hi)
    n_layer_sites = len(LAYER_SITES)

    def branch(v):
        first = members[v][0]
        stacked = {n: _stack([model.tensors[f"blk.{i}.{n}"] for i in members[v]]) for n in config_lib.LAYER_TENSORS}
        layer_capture = tuple(n for n in capture if n in LAYER_KINDS)

        def fields(res):
            return None if res is None else {s: res[f"blk.{first}.{s}"] for s, _ in LAYER_SITES}

        def run(x, layer, p, m, forced):
            w = jax.tree.map(lambda a: a[p], stacked)
            site = _Sites(fields(low), fields(hi), m, layer_capture, noise, layer * n_layer_sites)
            x, outs = _layer(cfg, w, x, forced, site)
            return x.astype(carry), dict(outs, sites=site.record)
        return run

    x0 = formats.dequantize(model.tensors["token_embd"].data[tokens], model.tensors["token_embd"].fmt).astype(carry)
    branches = [branch(v) for v in range(len(members))]
    m_layers = None if mix is None else mix[: cfg.n_layers * n_layer_sites].reshape(cfg.n_layers, n_layer_sites)
    forced0 = None if force_experts is None else force_experts[0]
    m0 = None if m_layers is None else m_layers[0]
    shapes = [jax.eval_shape(b, x0, 0, 0, m0, forced0) for b in branches]
    joined = jax.tree.map(lambda *s: jnp.result_type(*[a.dtype for a in s]), *shapes)
    cast = lambda out: jax.tree.map(lambda a, dt: a.astype(dt), out, joined)  # noqa: E731
    branches = [lambda *a, b=b: cast(b(*a)) for b in branches]

    # Rematerialised under reverse-mode differentiation: a gradient keeps only each layer's input and
    # recomputes the layer, instead of saving every layer's dequantized weights (the 30B shape's
    # experts are 120 GB in float32).
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(x, xs):
        v, layer, p, m, forced = xs
        x, outs = lax.switch(v, branches, x, layer, p, m, forced)
        return x, dict(outs, resid=x)

    x, per_layer = lax.scan(body, x0, (vid, np.arange(cfg.n_layers, dtype=np.int32), pos, m_layers, force_experts))
    m_glob = None if mix is None else mix[cfg.n_layers * n_layer_sites:]
    site = _Sites({n: low[n] for n in GLOBAL_KINDS}, None if hi is None else {n: hi[n] for n in GLOBAL_KINDS},
                  m_glob, capture, noise, cfg.n_layers * n_layer_sites)
    h = site("output_norm", lambda **p: rmsnorm(x, model.tensors["output_norm"], cfg.rms_eps, **p))
    logits = site("output", lambda **p: qmatvec(model.tensors["output"], h, **p))
    return Trace(logits=logits, resid=per_layer["resid"], router_logits=per_layer["router_logits"],
                 topk_idx=per_layer["topk_idx"], topk_w=per_layer["topk_w"], margin=per_layer["margin"],
                 sites={**per_layer["sites"], **site.record})
