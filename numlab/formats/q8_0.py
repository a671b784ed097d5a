"""Q8_0: 32 values as an fp16 scale d and 32 int8 codes (34 bytes), as ggml's quantize_row_q8_0_ref.

Floats: the codes come from one float32 product x * (1/d) rounded half away from zero (C `roundf`),
with no multiply-add anywhere, so XLA's multiply-add contraction under jit has nothing to contract.
Both divisions (d = amax/127 and 1/d) go through `div_rn`, correctly rounded on every backend: XLA's
simplifier would rewrite a / 127 as a * (1/127) and 1/(amax/127) as 127/amax, and XLA:GPU's own
float32 division is up to 2 ulp off; either changes about 5-13% of the scales in the last bit.
NaN/Inf follow ggml's C on x86: `amax = MAX(amax, |x|)` with `MAX(a, b) = a > b ? a : b` lets a NaN
reset the running maximum (see `ggml_amax`); a non-finite x/d becomes code 0 (x86 converts it to
0x80000000, whose low byte is 0); an Inf in the block gives d = Inf and all codes 0.
Subnormals: XLA on CPU flushes float32 subnormals to zero and ggml's C does not, so on CPU blocks
holding subnormal values, or whose d = amax/127 is subnormal (amax < 1.5e-36), can get other bytes
(XLA:GPU keeps subnormals).
"""
import jax
import jax.numpy as jnp
from jax import lax

from numlab.formats._common import Unpacked, div_rn, f16_bytes, f16_from_bytes, once

BLOCK_SIZE = 32
TYPE_SIZE = 34
GGML_TYPE = 8


def ggml_amax(x: jax.Array) -> jax.Array:
    """float32 [..., n] -> [...]: ggml's running `amax = MAX(amax, fabsf(x_j))` from amax = 0.

    A NaN element makes amax NaN and the next element replaces it, so the result is the largest |x|
    after the last NaN, or NaN when the last element is NaN.
    """
    n = x.shape[-1]
    pos = jnp.arange(n)
    last_nan = jnp.max(jnp.where(jnp.isnan(x), pos, -1), axis=-1, keepdims=True)
    amax = jnp.max(jnp.where(pos > last_nan, jnp.abs(x), 0.0), axis=-1)
    return jnp.where(last_nan[..., 0] == n - 1, jnp.nan, amax).astype(jnp.float32)


def scale_and_codes(x: jax.Array):
    """float32 [..., nb, 32] -> (d float32 [..., nb], q int8 [..., nb, 32]): d = amax/127, q = roundf(x/d)."""
    amax = ggml_amax(x)
    d = div_rn(amax, 127)
    inv = jnp.where(d != 0, div_rn(1, d), jnp.float32(0))
    r = lax.round(x * inv[..., None], lax.RoundingMethod.AWAY_FROM_ZERO)
    return d, jnp.where(jnp.isfinite(r), r, 0).astype(jnp.int8)


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 32] -> uint8 [..., nb, 34]: fp16 d, then 32 int8 codes."""
    d, q = scale_and_codes(x)
    return jnp.concatenate([f16_bytes(d), lax.bitcast_convert_type(q, jnp.uint8)], axis=-1)


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 34] -> codes int32 [..., nb, 32] and d float32 [..., nb]."""
    q = lax.bitcast_convert_type(raw[..., 2:], jnp.int8).astype(jnp.int32)
    return Unpacked(q=q, scales=None, mins=None, d=f16_from_bytes(raw[..., :2]), dmin=None)


def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 34] -> float32 [..., nb, 32]: q * d, one float32 product (dequantize_row_q8_0)."""
    u = unpack_blocks(raw)
    return u.q.astype(jnp.float32) * once(u.d)[..., None]
