"""RMSNorm over the last axis, every step in a chosen dtype."""
import jax.numpy as jnp

from numlab.ops.precision import jdtype
from numlab.ops.reduce import rsum


def rmsnorm(x, w, eps: float, dtype: str = "f32", order: str = "xla"):
    """x / sqrt(mean(x²) + eps) · w over the last axis; inputs cast to `dtype`, every operation in
    `dtype`, the sum of squares in `order` (see reduce.rsum)."""
    dt = jdtype(dtype)
    x = jnp.asarray(x).astype(dt)
    w = jnp.asarray(w).astype(dt)
    mean_sq = rsum(x * x, axis=-1, order=order) / jnp.asarray(x.shape[-1], dt)
    scale = jnp.asarray(1, dt) / jnp.sqrt(mean_sq + jnp.asarray(eps, dt))
    return x * scale[..., None] * w
