"""Sums along one axis in the array's own dtype, in a chosen order: xla, pairwise or sequential."""
import jax.numpy as jnp
from jax import lax

from numlab.ops.precision import ORDERS, check


def _pairwise(x):
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _sequential(x):
    total, _ = lax.scan(lambda c, v: (c + v, None), jnp.zeros_like(x[..., 0]), jnp.moveaxis(x, -1, 0))
    return total


def rsum(x, axis: int = -1, order: str = "xla"):
    """Sum of x over `axis` in x's dtype. xla: jnp.sum (XLA's order; JAX accumulates f16/bf16 in f32);
    pairwise: binary tree over adjacent pairs, each add rounded to the dtype; sequential: left to right."""
    check("order", order, ORDERS)
    if order == "xla":
        return jnp.sum(x, axis=axis, dtype=x.dtype)
    x = jnp.moveaxis(x, axis, -1)
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-1], x.dtype)
    return _pairwise(x) if order == "pairwise" else _sequential(x)
