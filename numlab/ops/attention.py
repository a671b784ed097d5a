"""Causal grouped-query attention over one sequence, every step in a chosen dtype."""
import math

import jax
import jax.numpy as jnp

from numlab.ops.precision import ORDERS, check, jdtype
from numlab.ops.reduce import rsum
from numlab.ops.softmax import softmax

_HI = jax.lax.Precision.HIGHEST


def attention(q, k, v, dtype: str = "f32", order: str = "xla"):
    """softmax(q·kᵀ/sqrt(Dh) + causal mask)·v for q[T, Hq, Dh], k, v[T, Hkv, Dh] -> [T, Hq, Dh];
    query head h reads kv head h // (Hq/Hkv). Every operation in `dtype`; the Dh dot, the softmax sum
    and the sum over keys in `order` (xla: einsum at HIGHEST precision)."""
    check("order", order, ORDERS)
    dt = jdtype(dtype)
    q, k, v = (jnp.asarray(a).astype(dt) for a in (q, k, v))
    t, hq, dh = q.shape
    hkv = k.shape[1]
    if k.shape != (t, hkv, dh) or v.shape != k.shape or hq % hkv:
        raise ValueError(f"attention needs q[T, Hq, Dh], k and v [T, Hkv, Dh] with Hkv dividing Hq; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    k = jnp.repeat(k, hq // hkv, axis=1)
    v = jnp.repeat(v, hq // hkv, axis=1)
    if order == "xla":
        s = jnp.einsum("thd,shd->hts", q, k, precision=_HI, preferred_element_type=dt)
    else:
        s = rsum(q[None, :, :, :] * k[:, None, :, :], axis=-1, order=order).transpose(2, 1, 0)
    s = s * jnp.asarray(1 / math.sqrt(dh), dt)
    causal = jnp.tril(jnp.ones((t, t), bool))
    p = softmax(jnp.where(causal, s, -jnp.inf), dtype, order)
    if order == "xla":
        return jnp.einsum("hts,shd->thd", p, v, precision=_HI, preferred_element_type=dt)
    out = rsum(p[:, :, :, None] * v.transpose(1, 0, 2)[:, None, :, :], axis=2, order=order)
    return out.transpose(1, 0, 2)
