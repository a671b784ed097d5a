"""Non-finite bisection: the first site, in forward order, whose output holds a NaN or Inf.

One forward pass captures every site ("*"); each site's output is reduced on device to a flag per
token, and the host picks the first flagged (site, token). The token embedding rows count as a site
before layer 0. Expert sites hold only the experts chosen for each token ([T, k, ...]).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import numlab.formats as formats
from numlab import policy as policy_lib
from numlab.models.qwen3_moe import forward
from numlab.models.sites import GLOBAL_SITES, LAYER_SITES, site_names

EMBEDDING = "token_embd"


class NonFinite(NamedTuple):
    """Where a NaN/Inf first appears: full site name, its layer (None for global sites), token position."""

    site: str
    layer: int | None
    token: int


def _row_names(config) -> tuple:
    """Names of the flag rows: the embedding, then every site in forward order (site_names)."""
    return (EMBEDDING,) + site_names(config)


def _bad(a, lead: int):
    """True per leading index [..lead axes] where any element behind it is NaN or Inf."""
    return ~jnp.isfinite(a.reshape(a.shape[:lead] + (-1,))).all(axis=-1)


@functools.partial(jax.jit, static_argnames=("policy",))
def _flags(model, tokens, policy):
    """bool [1 + n_sites, T], rows as _row_names: embedding, per-layer sites layer-major, global sites."""
    trace = forward(model, tokens, policy, capture="*")
    emb = model.tensors[EMBEDDING]
    rows = [_bad(formats.dequantize(emb.data[tokens], emb.fmt), 1)[None]]
    per_layer = []
    for name, _ in LAYER_SITES:
        per_layer.append(_bad(trace.sites[name], 2))
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
    site = _row_names(model.config)[row]
    layer = int(site.split(".")[1]) if site.startswith("blk.") else None
    return NonFinite(site, layer, int(np.argmax(flags[row])))


def nonfinite_report(model, tokens, policies: dict) -> dict:
    """{label: {"site", "layer", "token", "prompt"} or None} for each labelled policy (e.g.
    {"low": low, "ref": ref}): the earliest NaN/Inf site over the prompts of tokens int [T] or [P, T]
    (ties: the first prompt), for JSON reports and the `--find_nonfinite` flag."""
    prompts = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1])
    rank = {name: i for i, name in enumerate(_row_names(model.config))}
    out = {}
    for label, policy in policies.items():
        hits = [(rank[h.site], p, h) for p, t in enumerate(prompts)
                if (h := first_nonfinite(model, t, policy)) is not None]
        if not hits:
            out[label] = None
            continue
        _, prompt, hit = min(hits, key=lambda x: x[:2])
        out[label] = dict(hit._asdict(), prompt=prompt)
    return out
