"""MoE routing (softmax, top-k, renormalise, decision margin) and the weighted sum of expert outputs."""
import jax
import jax.numpy as jnp
from jax import lax

from numlab.ops.precision import jdtype
from numlab.ops.reduce import rsum
from numlab.ops.softmax import softmax

_HI = jax.lax.Precision.HIGHEST


def topk_route(probs, k: int, force_idx=None):
    """(idx int32[..., k], weights[..., k]): the k largest probs (or the forced indices) and their probs
    renormalised to sum 1, in probs' dtype. The choice is a step: gradients reach only the weights."""
    probs = jnp.asarray(probs)
    if force_idx is None:
        _, idx = lax.top_k(lax.stop_gradient(probs), k)
    else:
        idx = jnp.asarray(force_idx)
        if idx.shape != probs.shape[:-1] + (k,) or not jnp.issubdtype(idx.dtype, jnp.integer):
            raise ValueError(f"force_idx must be integer {probs.shape[:-1] + (k,)}, "
                             f"got {idx.dtype} {idx.shape}")
    idx = idx.astype(jnp.int32)
    sel = jnp.take_along_axis(probs, idx, axis=-1)
    return idx, sel / rsum(sel, axis=-1)[..., None]


def router_margin(logits, k: int):
    """k-th largest minus (k+1)-th largest logit over the last axis (>= 0; small means a near swap)."""
    logits = jnp.asarray(logits)
    n = logits.shape[-1]
    if not 1 <= k < n:
        raise ValueError(f"router_margin needs 1 <= k < {n} experts, got k={k}")
    top = lax.top_k(logits, k + 1)[0]
    return top[..., k - 1] - top[..., k]


def route(logits, k: int, dtype: str = "f32", order: str = "xla", force_idx=None):
    """(idx, weights, margin): softmax of the router logits in `dtype` (sum in `order`), top-k or the
    forced indices, weights renormalised over the k, and the logit margin of the k-th choice."""
    logits = jnp.asarray(logits).astype(jdtype(dtype))
    idx, weights = topk_route(softmax(logits, dtype, order), k, force_idx)
    return idx, weights, router_margin(logits, k)


def moe_sum(expert_out, weights, dtype: str = "f32", order: str = "xla"):
    """sum_k weights[..., k] · expert_out[..., k, :] -> [..., d]; products and sum in `dtype`, the sum
    over k in `order` (xla: einsum at HIGHEST precision)."""
    dt = jdtype(dtype)
    e = jnp.asarray(expert_out).astype(dt)
    w = jnp.asarray(weights).astype(dt)
    if order == "xla":
        return jnp.einsum("...kd,...k->...d", e, w, precision=_HI, preferred_element_type=dt)
    return rsum(e * w[..., None], axis=-2, order=order)
