"""Q8_1: 32 values as fp16 d, fp16 s and 32 int8 codes (36 bytes), as ggml's quantize_row_q8_1_ref.

d and the codes are Q8_0's (same float steps, same NaN/Inf behaviour); s = fp16(float32(sum of the
codes) * d) with the float32 d before its fp16 rounding, one product, so nothing for XLA to contract.
(ggml's CUDA quantizer stores the sum of the float inputs in s instead; this is the CPU reference.)
ggml has no dequantize for Q8_1; ours is d * q like Q8_0's.
"""
import jax
import jax.numpy as jnp
from jax import lax

from numlab.formats._common import Unpacked, f16_bytes, f16_from_bytes, once
from numlab.formats.q8_0 import scale_and_codes

BLOCK_SIZE = 32
TYPE_SIZE = 36
GGML_TYPE = 9


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 32] -> uint8 [..., nb, 36]: fp16 d, fp16 s = d * sum(q), 32 int8 codes."""
    d, q = scale_and_codes(x)
    s = jnp.sum(q.astype(jnp.int32), axis=-1).astype(jnp.float32) * d
    return jnp.concatenate([f16_bytes(d), f16_bytes(s), lax.bitcast_convert_type(q, jnp.uint8)], axis=-1)


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 36] -> codes int32 [..., nb, 32] and d float32 [..., nb] (s is not unpacked)."""
    q = lax.bitcast_convert_type(raw[..., 4:], jnp.int8).astype(jnp.int32)
    return Unpacked(q=q, scales=None, mins=None, d=f16_from_bytes(raw[..., :2]), dmin=None)



def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 36] -> float32 [..., nb, 32]: q * d, one float32 product."""
    u = unpack_blocks(raw)
    return u.q.astype(jnp.float32) * once(u.d)[..., None]
