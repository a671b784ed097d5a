"""Softmax over the last axis with the maximum subtracted, every step in a chosen dtype."""
import jax.numpy as jnp

from numlab.ops.precision import jdtype
from numlab.ops.reduce import rsum


def softmax(x, dtype: str = "f32", order: str = "xla"):
    """exp(x - max x) / sum exp(x - max x) over the last axis; every operation in `dtype`, the
    denominator summed in `order` (see reduce.rsum). Entries of -inf get probability 0."""
    x = jnp.asarray(x).astype(jdtype(dtype))
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / rsum(e, axis=-1, order=order)[..., None]
