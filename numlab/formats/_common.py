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
    """uint8 [..., 2] -> float32 [...] (exact, decoded with integer ops: `f16_value`)."""
    return f16_value(lax.bitcast_convert_type(b, jnp.float16))


def f16_value(h: jax.Array) -> jax.Array:
    """float32 value of float16 `h`, decoded from its bits with integer ops.

    `h.astype(float32)` right after an f32 -> f16 rounding is a convert pair that XLA, allowed excess
    precision (its default), removes: the GPU compile then used the unrounded f32 scale (seen on an
    H100 in the k-quants). No compiler folds this decode back into the f32 input.
    """
    bits = lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.int32)
    sign = (bits & 0x8000) << 16
    e, m = (bits >> 10) & 0x1F, bits & 0x3FF
    normal = ((e + 112) << 23) | (m << 13)                       # rebias 15 -> 127
    special = 0x7F800000 | (m << 13)                             # inf, NaN
    subnormal = lax.bitcast_convert_type(m.astype(jnp.float32) * jnp.float32(2.0 ** -24), jnp.int32)
    mag = jnp.where(e == 0x1F, special, jnp.where(e == 0, subnormal, normal))
    return lax.bitcast_convert_type(sign | mag, jnp.float32)


def low_value(h: jax.Array) -> jax.Array:
    """float32 value of bf16 or f16 `h`, decoded from its bits with integer ops (see `f16_value`)."""
    if h.dtype == jnp.float16:
        return f16_value(h)
    if h.dtype != jnp.bfloat16:
        raise TypeError(f"low_value takes bfloat16 or float16, got {h.dtype}")
    return lax.bitcast_convert_type(lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32) << 16, jnp.float32)


def once(v: jax.Array) -> jax.Array:
    """`v` unchanged (v / 1 is exact), computed once into its own buffer.

    XLA's CPU fusion copies cheap producers into every consumer (the 32-term sums were summed
    five times per candidate, per-sub-block values recomputed for every element they are
    broadcast to, transposes left as strided reads); it does not duplicate a division, so a
    division by 1 is materialised once. Speed only: the bits do not change.
    """
    return v / lax.optimization_barrier(jnp.ones_like(v))


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


def _split(bits):
    """int32 bits of |x| -> (24-bit normalised significand, unbiased-by-127 exponent) for finite x != 0."""
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    shift = jnp.where(e == 0, lax.clz(m) - 8, 0)
    return jnp.where(e == 0, m << shift, m | 0x800000), jnp.where(e == 0, 1 - shift, e)


def div_exact(a: jax.Array, b: jax.Array) -> jax.Array:
    """Correctly rounded float32 a / b (round to nearest even, subnormals kept) by integer long division."""
    ab = lax.bitcast_convert_type(a, jnp.int32)
    bb = lax.bitcast_convert_type(b, jnp.int32)
    sign = (ab ^ bb) & jnp.int32(-0x80000000)
    ma, ea = _split(ab & 0x7FFFFFFF)
    mb, eb = _split(bb & 0x7FFFFFFF)
    lower = ma < mb
    r = jnp.where(lower, ma << 1, ma)
    exp = ea - eb + 127 - lower.astype(jnp.int32)
    q = jnp.zeros_like(r)
    for _ in range(25):  # 24 significand bits and one guard bit; the remainder gives the sticky bit
        bit = r >= mb
        q = (q << 1) | bit.astype(jnp.int32)
        r = (r - jnp.where(bit, mb, 0)) << 1
    sticky = r != 0
    drop = jnp.clip(jnp.where(exp >= 1, 1, 2 - exp), 1, 26)
    kept = q >> drop
    rem = q & ((jnp.int32(1) << drop) - 1)
    half = jnp.int32(1) << (drop - 1)
    up = (rem > half) | ((rem == half) & (sticky | ((kept & 1) == 1)))
    kept = kept + up.astype(jnp.int32)
    mag = jnp.where(exp >= 1, ((exp - 1) << 23) + kept, kept)
    mag = jnp.where((exp >= 255) | (mag >= 0x7F800000), 0x7F800000, mag)
    # Special operands are told apart on the bits: CPU float compares treat subnormals as zero.
    aa, ba = ab & 0x7FFFFFFF, bb & 0x7FFFFFFF
    a_inf, b_inf, a_zero, b_zero = aa == 0x7F800000, ba == 0x7F800000, aa == 0, ba == 0
    nan = (aa > 0x7F800000) | (ba > 0x7F800000) | (a_inf & b_inf) | (a_zero & b_zero)
    mag = jnp.where(a_inf | b_zero, 0x7F800000, jnp.where(a_zero | b_inf, 0, mag))
    return lax.bitcast_convert_type(jnp.where(nan, 0x7FC00000, sign | mag), jnp.float32)


def div_rn(a, b) -> jax.Array:
    """float32 a / b rounded to nearest even, as C computes it, on every backend.

    XLA:GPU lowers float32 division to PTX `div.full` (up to 2 ulp off: 4.6% of amax/127 and 13% of
    1/d differ from IEEE, measured on an H100); there this runs an exact integer long division. On
    CPU XLA's division is IEEE; the barrier keeps the simplifier from rewriting a / c as a * (1/c).
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return lax.platform_dependent(a, b, cpu=lambda x, y: x / lax.optimization_barrier(y),
                                  default=div_exact)


def _limbs_gt(hi_a, lo_a, hi_b, lo_b):
    """(hi_a * 2**24 + lo_a) > (hi_b * 2**24 + lo_b) for normalised limbs (0 <= lo < 2**24)."""
    return (hi_a > hi_b) | ((hi_a == hi_b) & (lo_a > lo_b))


def _square_plus(q, c):
    """q*q + c as base-2**24 limbs (hi, lo), exact in int32 for 0 <= q <= 2**24 + 2 and |c| <= q."""
    a, b = q >> 12, q & 0xFFF
    ab2 = 2 * a * b
    lo = ((ab2 & 0xFFF) << 12) + b * b + c
    return a * a + (ab2 >> 12) + (lo >> 24), lo & 0xFFFFFF


def sqrt_correct(x: jax.Array, approx: jax.Array) -> jax.Array:
    """Correctly rounded float32 sqrt(x), from `approx` within 3 ulp of it, by exact integer checks.

    For x = M * 2**(e-23) (M its 24-bit significand, subnormals normalised), N = M * 2**k (k = 23 or
    24, making e-23-k even) lies in [2**46, 2**48) and sqrt(x) = sqrt(N) * 2**((e-23-k)/2): the
    result's significand is the integer q nearest sqrt(N), i.e. q*q - q < N <= q*q + q (no ties).
    """
    bits = lax.bitcast_convert_type(x, jnp.int32)
    m, e = _split(bits & 0x7FFFFFFF)
    e = e - 127
    odd = e & 1
    n_hi, n_lo = jnp.where(odd == 1, m, m >> 1), jnp.where(odd == 1, 0, (m & 1) << 23)
    p = (e - 46 - odd) >> 1                                       # sqrt(x) = q * 2**p
    pow2 = lambda k: lax.bitcast_convert_type((k + 127) << 23, jnp.float32)
    q = jnp.clip(approx * pow2(-p), 2.0 ** 23, 2.0 ** 24).astype(jnp.int32)  # sqrt(N) lies in there
    for _ in range(3):
        up = _limbs_gt(n_hi, n_lo, *_square_plus(q, q))
        down = ~_limbs_gt(n_hi, n_lo, *_square_plus(q, -q))
        q = q + up.astype(jnp.int32) - down.astype(jnp.int32)
    ordinary = (bits > 0) & (bits < 0x7F800000)                   # positive, finite, not zero (on the bits)
    return jnp.where(ordinary, q.astype(jnp.float32) * pow2(p), approx)


def sqrt_rn(x) -> jax.Array:
    """float32 sqrt(x) rounded to nearest even on every backend (C's sqrtf).

    XLA:GPU's float32 sqrt is not correctly rounded (11% of the k-quants' sqrt(sum x**2 / 32) differed
    from CPU by an ulp on an H100); there the approximate root is corrected by exact integer checks.
    """
    x = jnp.asarray(x, jnp.float32)
    return lax.platform_dependent(x, cpu=jnp.sqrt, default=lambda v: sqrt_correct(v, jnp.sqrt(v)))
