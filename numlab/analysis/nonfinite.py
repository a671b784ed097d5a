"""Non-finite bisection: the first site, in forward order, whose output holds a NaN or Inf.

One forward pass captures every site ("*"); each site's output is reduced on device to a flag per
token, and the host picks the first flagged (site, token). The token embedding rows count as a site
before layer 0. Expert sites compute every expert densely, so only the experts chosen for a token
(its top-k) count: a NaN in an expert no token uses changes nothing.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import numlab.formats as formats
from numlab import policy as policy_lib
from numlab.models.qwen3_moe import forward
from numlab.models.sites import GLOBAL_SITES, LAYER_SITES

EMBEDDING = "token_embd"
EXPERT_SITES = ("ffn_gate_exps", "ffn_up_exps", "silu", "ffn_down_exps")  # outputs [L, T, E, ...]


class NonFinite(NamedTuple):
    """Where a NaN/Inf first appears: full site name, its layer (None for global sites), token position."""

    site: str
    layer: int | None
    token: int


def _bad(a, lead: int):
    """True per leading index [..lead axes] where any element behind it is NaN or Inf."""
    return ~jnp.isfinite(a.reshape(a.shape[:lead] + (-1,))).all(axis=-1)


@functools.partial(jax.jit, static_argnames=("policy",))
def _flags(model, tokens, policy):
    """bool [1 + L*S + G, T]: embedding, per-layer sites (layer-major, forward order), global sites."""
    trace = forward(model, tokens, policy, capture="*")
    emb = model.tensors[EMBEDDING]
    rows = [_bad(formats.dequantize(emb.data[tokens], emb.fmt), 1)[None]]
    per_layer = []
    for name, _ in LAYER_SITES:
        a = trace.sites[name]
        if name in EXPERT_SITES:
            a = jnp.take_along_axis(a, trace.topk_idx[..., None], axis=2)
        per_layer.append(_bad(a, 2))
    n_layers, t = trace.resid.shape[:2]
    rows.append(jnp.stack(per_layer, axis=1).reshape(-1, t))
    rows.append(jnp.stack([_bad(trace.sites[name], 1) for name, _ in GLOBAL_SITES]))
    return jnp.concatenate(rows)


def first_nonfinite(model, tokens, policy) -> NonFinite | None:
    """The first site (forward order) and token whose output is NaN/Inf when `model` runs `tokens`
    int [T] under `policy` (Policy, preset name or rule text); None if every output is finite."""
    flags = np.asarray(_flags(model, jnp.asarray(tokens, jnp.int32), policy_lib.get(policy)))
    hits = np.flatnonzero(flags.any(axis=1))
    if hits.size == 0:
        return None
    row = int(hits[0])
    token = int(np.argmax(flags[row]))
    n_layer_rows = model.config.n_layers * len(LAYER_SITES)
    if row == 0:
        return NonFinite(EMBEDDING, None, token)
    if row <= n_layer_rows:
        layer, s = divmod(row - 1, len(LAYER_SITES))
        return NonFinite(f"blk.{layer}.{LAYER_SITES[s][0]}", layer, token)
    return NonFinite(GLOBAL_SITES[row - 1 - n_layer_rows][0], None, token)


def nonfinite_report(model, tokens, policies: dict) -> dict:
    """{label: {"site", "layer", "token"} or None} of first_nonfinite for each labelled policy, for JSON
    reports (e.g. policies={"low": low, "ref": ref})."""
    out = {}
    for label, policy in policies.items():
        hit = first_nonfinite(model, tokens, policy)
        out[label] = None if hit is None else hit._asdict()
    return out
