"""Q8_K: 256 values as a float32 scale d, 256 int8 codes and 16 int16 sums of 16 codes (292 bytes).

Bytes of ggml's CPU `quantize_row_q8_K`, which on x86 (and in the ggml-python build) is
`quantize_row_q8_K_ref`: max = the first x of largest |x|, iscale = -127/max, q = min(127,
nearest_int(iscale * x)), d = 1/iscale, bsums = sums of 16 consecutive codes.
Floats: ggml's nearest_int adds 1.5*2^23 to the float32 product and reads the low mantissa bits,
i.e. fl(fl(iscale*x) + 1.5*2^23). Written that way, XLA contracts the multiply-add into an FMA under
jit and rounds the exact product instead. We round the float32 product with round-half-to-even
(`lax.round(..., TO_NEAREST_EVEN)`), which equals the magic-number result for |p| < 2^22, so there is
no add to contract and jit and eager agree with ggml. -127/max and d = 1/iscale go through `div_rn`,
correctly rounded on every backend (XLA's simplifier rewrites 1/(a/b) as b/a, and XLA:GPU's float32
division is up to 2 ulp off).
NaN/Inf: NaNs are skipped by the max search (`ax > amax` is false); an all-zero (or all-NaN) block
gets d = 0 and zero codes and sums (ggml leaves bsums unwritten there; we write 0). A non-finite
product becomes code 0, as in ggml, whose bit trick yields 0 (after the int8 store) for +-Inf and for
the default quiet NaN (NaN inputs carrying payload bits are not emulated). So an Inf in the block
gives iscale = -+0, d = -sign(max)*Inf and all codes 0, and a block whose -127/max overflows
(|max| < 3.8e-37) gives iscale = -+Inf, d = -+0 and all codes 0.
Subnormals: XLA on CPU flushes float32 subnormals to zero and ggml's C does not, so on CPU blocks
holding subnormal values, or whose d is subnormal (|max| < 1.5e-36), can get other bytes.
"""
import jax
import jax.numpy as jnp
from jax import lax

from numlab.formats._common import Unpacked, div_rn, f32_bytes, f32_from_bytes, i16_bytes

BLOCK_SIZE = 256
TYPE_SIZE = 292
GGML_TYPE = 15
_SUB = 16


def scale_and_codes(x: jax.Array):
    """float32 [..., nb, 256] -> (d float32 [..., nb], codes int8 [..., nb, 256]): quantize_blocks' values
    before their bytes."""
    amax = jnp.max(jnp.where(jnp.isnan(x), 0.0, jnp.abs(x)), axis=-1, keepdims=True)
    # max is +amax or -amax, whichever comes first (two min-reductions; XLA's argmax is slow on CPU).
    pos = jnp.arange(BLOCK_SIZE)
    first_pos = jnp.min(jnp.where(x == amax, pos, BLOCK_SIZE), axis=-1, keepdims=True)
    first_neg = jnp.min(jnp.where(x == -amax, pos, BLOCK_SIZE), axis=-1, keepdims=True)
    mx = jnp.where(first_pos < first_neg, amax, -amax)
    zero = amax == 0
    iscale = jnp.where(zero, jnp.float32(0), div_rn(-127, jnp.where(zero, 1, mx)))
    p = iscale * x
    v = jnp.where(jnp.isfinite(p), lax.round(p, lax.RoundingMethod.TO_NEAREST_EVEN), 0)
    q = jnp.minimum(v, 127).astype(jnp.int8)
    d = jnp.where(zero[..., 0], jnp.float32(0), div_rn(1, iscale[..., 0]))
    return d, q


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 256] -> uint8 [..., nb, 292]: f32 d, 256 int8 codes, 16 int16 bsums."""
    d, q = scale_and_codes(x)
    bsums = jnp.sum(q.astype(jnp.int32).reshape(q.shape[:-1] + (_SUB, BLOCK_SIZE // _SUB)), axis=-1)
    sums_bytes = i16_bytes(bsums).reshape(bsums.shape[:-1] + (2 * _SUB,))
    return jnp.concatenate([f32_bytes(d), lax.bitcast_convert_type(q, jnp.uint8), sums_bytes], axis=-1)


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 292] -> codes int32 [..., nb, 256] and d float32 [..., nb] (bsums not unpacked)."""
    q = lax.bitcast_convert_type(raw[..., 4:4 + BLOCK_SIZE], jnp.int8).astype(jnp.int32)
    return Unpacked(q=q, scales=None, mins=None, d=f32_from_bytes(raw[..., :4]), dmin=None)



def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 292] -> float32 [..., nb, 256]: d * q, one float32 product (dequantize_row_q8_K)."""
    u = unpack_blocks(raw)
    return u.q.astype(jnp.float32) * u.d[..., None]
