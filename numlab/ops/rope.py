"""Rotary position embedding, NeoX layout (the two halves of each head rotate together)."""
import jax.numpy as jnp

from numlab.ops.precision import jdtype


def rope(x, pos, theta: float, dtype: str = "f32"):
    """Rotate x[T, H, Dh]: pair (x_i, x_{i+Dh/2}) turns by angle pos·theta^(-2i/Dh). Angles, cos and sin
    are computed in float64 for dtype f64 and in float32 otherwise (as engines do), then rounded to
    `dtype`; the rotation itself runs in `dtype`."""
    dt = jdtype(dtype)
    x = jnp.asarray(x).astype(dt)
    dh = x.shape[-1]
    if dh % 2:
        raise ValueError(f"rope needs an even head dimension, got {dh}")
    table = jnp.float64 if dtype == "f64" else jnp.float32
    inv_freq = jnp.asarray(theta, table) ** (-jnp.arange(0, dh, 2, dtype=table) / jnp.asarray(dh, table))
    angle = jnp.asarray(pos).astype(table)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angle).astype(dt)[:, None, :]
    sin = jnp.sin(angle).astype(dt)[:, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
