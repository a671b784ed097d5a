"""Q5_K: 256-value super-blocks of 8 x 32, 5-bit codes, 6-bit sub-block scales and mins, fp16 d/dmin.

Layout (176 bytes, ggml's block_q5_K): fp16 d, fp16 dmin, 12 bytes of packed scales/mins, 32 bytes
qh of high bits (bit 2c of qh[i] is value 64c+i's, bit 2c+1 value 64c+32+i's), 128 bytes of low
nibbles arranged as in Q4_K. quantize_blocks is ggml's quantize_row_q5_K_ref (what
ggml_quantize_chunk runs with no importance matrix) bit for bit; see kquant_search for how float32
roundings are kept identical under jit. Blocks holding a NaN or an infinity have no defined result
in ggml (its nearest_int asserts |v| <= 4194303 in debug builds; release builds write finite
garbage): here such a block becomes d = dmin = fp16 NaN with zero scales and codes, so it
dequantizes to NaN and the bad value stays visible.
XLA on CPU flushes float32 subnormals to zero, so blocks of tiny values (|x| below about 1e-11,
where ggml's weighted errors ~ x**3 turn subnormal) can differ from ggml.
"""
import jax
import jax.numpy as jnp

from numlab.formats import kquant_search as ks
from numlab.formats._common import Unpacked, f16_from_bytes

BLOCK_SIZE = 256
TYPE_SIZE = 176
GGML_TYPE = 13
_NAN_MARKER = (0x00, 0x7E, 0x00, 0x7E) + (0,) * (TYPE_SIZE - 4)  # d = dmin = fp16 NaN


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 256] -> uint8 [..., nb, 176], ggml's quantize_row_q5_K_ref bytes."""
    x = jnp.asarray(x)
    ks.check_blocks(x, BLOCK_SIZE, "q5_k", "input")
    if x.dtype != jnp.float32:
        raise TypeError(f"q5_k quantize expects float32, got {x.dtype}")
    flat = x.reshape(-1, BLOCK_SIZE)
    head, codes = ks.quantize_super_blocks(flat, nmax=31, rmin=-0.5, nstep=15)
    c = codes.reshape(-1, 4, 2, 32)  # [m, chunk c, half h, i]: value 64c + 32h + i
    low = c & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (c >> 4).reshape(-1, 8, 32)  # row 2c + h: the high bits of values 64c + 32h + i
    qh = high[:, 0]
    for bit in range(1, 8):
        qh = qh | (high[:, bit] << bit)
    out = jnp.concatenate([head, qh.astype(jnp.uint8), qs.astype(jnp.uint8)], axis=-1)
    out = ks.mark_non_finite(out, flat, _NAN_MARKER)
    return out.reshape(x.shape[:-1] + (TYPE_SIZE,))


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 176] -> codes 0..31 [..., nb, 256], 6-bit scales/mins [..., nb, 8], d, dmin."""
    raw = jnp.asarray(raw)
    ks.check_blocks(raw, TYPE_SIZE, "q5_k", "data")
    scales, mins = ks.unpack_scales(raw[..., 4:16])
    qh = raw[..., 16:48].astype(jnp.int32)[..., None, :]                       # [..., 1, 32]
    high = (qh >> jnp.arange(8, dtype=jnp.int32)[:, None]) & 1                  # [..., 8, 32]
    qs = raw[..., 48:].astype(jnp.int32).reshape(raw.shape[:-1] + (4, 1, 32))
    low = ((qs >> jnp.array([0, 4], jnp.int32)[:, None]) & 0xF).reshape(raw.shape[:-1] + (8, 32))
    q = (low | (high << 4)).reshape(raw.shape[:-1] + (BLOCK_SIZE,))
    return Unpacked(q=q, scales=scales, mins=mins,
                    d=f16_from_bytes(raw[..., 0:2]), dmin=f16_from_bytes(raw[..., 2:4]))


def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 176] -> float32 [..., nb, 256]: (d*sc)*q - dmin*m, as dequantize_row_q5_K."""
    return ks.dequantize_with_mins(unpack_blocks(raw))
