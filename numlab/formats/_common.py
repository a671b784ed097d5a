"""Byte-level helpers shared by the block codecs: fp16 fields, little-endian packing, unpacked view."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax


class Unpacked(NamedTuple):
    """A block's integer codes and scales, as ggml's dot products use them.

    q: int32 [..., block_size] codes (q4_k 0..15, q5_k 0..31, q6_k -32..31, q8_* -128..127);
    scales / mins: int32 [..., n_sub] sub-block scales and mins (None where the format has none);
    d / dmin: float32 [...] super-block scales read from their fp16 (or f32) fields.
    """

    q: jax.Array
    scales: Optional[jax.Array]
    mins: Optional[jax.Array]
    d: jax.Array
    dmin: Optional[jax.Array]


def f16_bytes(x: jax.Array) -> jax.Array:
    """float32 [...] -> uint8 [..., 2]: IEEE half, round to nearest even (ggml's GGML_FP32_TO_FP16)."""
    return lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint8)


def f16_from_bytes(b: jax.Array) -> jax.Array:
    """uint8 [..., 2] -> float32 [...] (exact)."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def f32_bytes(x: jax.Array) -> jax.Array:
    """float32 [...] -> uint8 [..., 4] (little-endian bit pattern)."""
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint8)


def f32_from_bytes(b: jax.Array) -> jax.Array:
    """uint8 [..., 4] -> float32 [...]."""
    return lax.bitcast_convert_type(b, jnp.float32)


def i16_bytes(x: jax.Array) -> jax.Array:
    """int [...] -> uint8 [..., 2] (int16, little-endian)."""
    return lax.bitcast_convert_type(x.astype(jnp.int16), jnp.uint8)


def i16_from_bytes(b: jax.Array) -> jax.Array:
    """uint8 [..., 2] -> int32 [...] from little-endian int16."""
    return lax.bitcast_convert_type(b, jnp.int16).astype(jnp.int32)
