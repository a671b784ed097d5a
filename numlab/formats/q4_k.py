"""Q4_K: 256-value super-blocks of 8 x 32, 4-bit codes, 6-bit sub-block scales and mins, fp16 d/dmin.

Layout (144 bytes, ggml's block_q4_K): fp16 d, fp16 dmin, 12 bytes of packed scales/mins, 128 bytes
of codes (byte i of 32-byte chunk c holds value 64c+i in its low nibble and 64c+32+i in its high).
quantize_blocks is ggml's quantize_row_q4_K_ref (what ggml_quantize_chunk runs with no importance
matrix) bit for bit; see kquant_search for how float32 roundings are kept identical under jit.
Blocks holding a NaN or an infinity have no defined result in ggml (its nearest_int asserts
|v| <= 4194303 in debug builds; release builds write finite garbage): here such a block becomes
d = dmin = fp16 NaN with zero scales and codes, so it dequantizes to NaN and the bad value stays
visible.
XLA on CPU flushes float32 subnormals to zero, so blocks of tiny values (|x| below about 1e-11,
where ggml's weighted errors ~ x**3 turn subnormal) can differ from ggml.
"""
import jax
import jax.numpy as jnp

from numlab.formats import kquant_search as ks
from numlab.formats._common import Unpacked, f16_from_bytes

BLOCK_SIZE = 256
TYPE_SIZE = 144
GGML_TYPE = 12
_NAN_MARKER = (0x00, 0x7E, 0x00, 0x7E) + (0,) * (TYPE_SIZE - 4)  # d = dmin = fp16 NaN


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 256] -> uint8 [..., nb, 144], ggml's quantize_row_q4_K_ref bytes."""
    x = jnp.asarray(x)
    ks.check_blocks(x, BLOCK_SIZE, "q4_k", "input")
    if x.dtype != jnp.float32:
        raise TypeError(f"q4_k quantize expects float32, got {x.dtype}")
    flat = x.reshape(-1, BLOCK_SIZE)
    head, codes = ks.quantize_super_blocks(flat, nmax=15, rmin=-1.0, nstep=20)
    c = codes.reshape(-1, 4, 2, 32)  # [m, chunk c, half h, i]: value 64c + 32h + i
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128).astype(jnp.uint8)
    out = ks.mark_non_finite(jnp.concatenate([head, qs], axis=-1), flat, _NAN_MARKER)
    return out.reshape(x.shape[:-1] + (TYPE_SIZE,))


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 144] -> codes 0..15 [..., nb, 256], 6-bit scales/mins [..., nb, 8], d, dmin."""
    raw = jnp.asarray(raw)
    ks.check_blocks(raw, TYPE_SIZE, "q4_k", "data")
    scales, mins = ks.unpack_scales(raw[..., 4:16])
    qs = raw[..., 16:].astype(jnp.int32).reshape(raw.shape[:-1] + (4, 1, 32))
    q = (qs >> jnp.array([0, 4], jnp.int32)[:, None]) & 0xF
    return Unpacked(q=q.reshape(raw.shape[:-1] + (BLOCK_SIZE,)), scales=scales, mins=mins,
                    d=f16_from_bytes(raw[..., 0:2]), dmin=f16_from_bytes(raw[..., 2:4]))


def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 144] -> float32 [..., nb, 256]: (d*sc)*q - dmin*m, as dequantize_row_q4_K."""
    return ks.dequantize_with_mins(unpack_blocks(raw))
