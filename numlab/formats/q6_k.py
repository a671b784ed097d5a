"""Q6_K: 256-value super-blocks of 16 x 16, 6-bit codes, int8 sub-block scales, fp16 d.

Layout (210 bytes, ggml's block_q6_K): 128 bytes ql of low nibbles, 64 bytes qh of high 2-bit
pairs, 16 int8 scales, fp16 d. In each half h of 128 values, ql[64h + i] holds values
128h + i (low nibble) and 128h + 64 + i (high), ql[64h + 32 + i] values 128h + 32 + i and
128h + 96 + i, and qh[32h + i] the top two bits of values 128h + 32k + i at bits 2k.
quantize_blocks is ggml's quantize_row_q6_K_ref (what ggml_quantize_chunk runs with no importance
matrix) bit for bit, with make_qx_quants (rmse_type 1) for the sub-block scales; see kquant_search
for how float32 roundings are kept identical under jit. Blocks holding a NaN or an infinity have no
defined result in ggml (its nearest_int asserts |v| <= 4194303 in debug builds; release builds
write finite garbage): here such a block becomes d = fp16 NaN with zero scales and codes, so it
dequantizes to NaN and the bad value stays visible. XLA on CPU flushes float32 subnormals to zero,
so sub-blocks of tiny values can differ from ggml: the search compares products of order x**6
that turn subnormal once a sub-block's largest |x| is below about 1e-6 (seen from 1e-7 down).
"""
import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from numlab.formats import kquant_search as ks
from numlab.formats._common import Unpacked, f16_from_bytes, f16_value

BLOCK_SIZE = 256
TYPE_SIZE = 210
GGML_TYPE = 14
F32 = jnp.float32
_NMAX = 32
_NAN_MARKER = (0,) * (TYPE_SIZE - 2) + (0x00, 0x7E)  # d = fp16 NaN


def _first_absmax(v):
    """ggml's running `if (|v_i| > amax) {amax = |v_i|; max = v_i}` from 0 over axis 0: (amax, max).

    The first element of largest magnitude wins; a NaN never does.
    """
    amax = jnp.zeros_like(v[0])
    vmax = jnp.zeros_like(v[0])
    for vi in v:
        take = jnp.abs(vi) > amax
        amax = jnp.where(take, jnp.abs(vi), amax)
        vmax = jnp.where(take, vi, vmax)
    return amax, vmax


def _codes(iscale, x, keep):
    """clamp(nearest_int(iscale * x), -32, 31) as int32."""
    return jnp.clip(ks.nearest_int(ks.mul(iscale, x, keep)), -_NMAX, _NMAX - 1)


def _moments(lf, x, w, keep):
    """(sum w*x*l, sum w*l*l) over axis 0 in ggml's order; w = x*x."""
    sumlx = ks.once(ks.seq_sum(ks.mul(w * x, lf, keep)))
    suml2 = ks.once(ks.seq_sum(ks.mul(w * lf, lf, keep)))
    return sumlx, suml2


def make_qx_quants(x, keep):
    """ggml's make_qx_quants(n, nmax=32, rmse_type=1, no weights) on columns x[n, ...].

    Starts from the inverse scale -nmax/max, then tries -(nmax + 0.1*is)/max for is = -9..9
    (is != 0) in order (a scan, vectorised over columns), accepting a candidate when
    sumlx^2 > best*suml2 and updating best, as ggml does. Returns float32 [...] (scale, iscale)
    and bool `zero`: ggml's codes are 0 where `zero`, else `_codes(iscale, x, keep)`.
    """
    amax, xmax = _first_absmax(x)
    zero = amax < ks.GROUP_MAX_EPS
    w = x * x

    iscale0 = ks.div(F32(-_NMAX), xmax)
    sumlx0, suml20 = _moments(_codes(iscale0, x, keep).astype(F32), x, w, keep)
    scale0 = jnp.where(suml20 != 0, ks.div(sumlx0, suml20), F32(0))

    def step(carry, numer):
        scale, best, iscale_sel = carry
        iscale = ks.div(numer, xmax)
        sumlx, suml2 = _moments(_codes(iscale, x, keep).astype(F32), x, w, keep)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = ks.div(sumlx, suml2)
        return (jnp.where(take, new_scale, scale), jnp.where(take, new_scale * sumlx, best),
                jnp.where(take, iscale, iscale_sel)), None

    steps = np.array([i for i in range(-9, 10) if i != 0], np.float32)
    numers = -(np.float32(_NMAX) + np.float32(0.1) * steps)
    (scale, _, iscale), _ = lax.scan(step, (scale0, scale0 * sumlx0, iscale0), jnp.asarray(numers))
    return jnp.where(zero, F32(0), scale), iscale, zero


def quantize_blocks(x: jax.Array) -> jax.Array:
    """float32 [..., nb, 256] -> uint8 [..., nb, 210], ggml's quantize_row_q6_K_ref bytes."""
    x = jnp.asarray(x)
    ks.check_blocks(x, BLOCK_SIZE, "q6_k", "input")
    if x.dtype != jnp.float32:
        raise TypeError(f"q6_k quantize expects float32, got {x.dtype}")
    flat = x.reshape(-1, BLOCK_SIZE)
    m = flat.shape[0]
    xs = ks.once(flat.reshape(m, 16, 16).transpose(2, 1, 0))  # [16, 16, m]: element axis first
    keep = xs == xs
    scales, iscale, zero = make_qx_quants(xs, keep)           # [16, m] each
    scales = ks.once(scales)

    max_abs, max_scale = (ks.once(v) for v in _first_absmax(scales))
    zero_block = max_abs < ks.GROUP_MAX_EPS
    inv = ks.div(F32(-128), max_scale)
    d16 = ks.div(F32(1), inv).astype(jnp.float16)
    sc = jnp.minimum(127, ks.nearest_int(ks.mul(inv, scales, keep[0])))
    sc8 = lax.bitcast_convert_type((sc & 0xFF).astype(jnp.uint8), jnp.int8).T  # ggml stores int8

    # The codes, in the input's own layout [m, 16, 16]: re-quantized with the rounded scales,
    # except where ggml skips a sub-block whose scale is 0 and keeps the search's codes.
    # d*sc is exact (fp16 times 8 bits).
    # Per-sub-block values are materialised ([m, 16], `once`) before they are broadcast.
    xn = flat.reshape(m, 16, 16)
    zero_t = ks.once(zero.T.astype(F32))[..., None] != 0
    searched = jnp.where(zero_t, 0, _codes(ks.once(iscale.T)[..., None], xn, xn == xn) + _NMAX)
    dj = ks.once(f16_value(d16)[:, None] * sc8.astype(F32))[..., None]
    requant = jnp.clip(ks.nearest_int(ks.div(xn, dj)), -_NMAX, _NMAX - 1) + _NMAX
    codes = jnp.where(dj != 0, requant, searched).reshape(m, 2, 4, 32)  # [m, half, quarter, i]

    ql = jnp.concatenate([codes[:, :, 0] & 0xF | ((codes[:, :, 2] & 0xF) << 4),
                          codes[:, :, 1] & 0xF | ((codes[:, :, 3] & 0xF) << 4)], axis=-1)
    qh = ((codes[:, :, 0] >> 4) | ((codes[:, :, 1] >> 4) << 2) | ((codes[:, :, 2] >> 4) << 4)
          | ((codes[:, :, 3] >> 4) << 6))
    out = jnp.concatenate([ql.reshape(m, 128).astype(jnp.uint8), qh.reshape(m, 64).astype(jnp.uint8),
                           lax.bitcast_convert_type(sc8, jnp.uint8),
                           lax.bitcast_convert_type(d16, jnp.uint8)], axis=-1)
    out = jnp.where(zero_block[:, None], jnp.uint8(0), out)
    out = ks.mark_non_finite(out, flat, _NAN_MARKER)
    return out.reshape(x.shape[:-1] + (TYPE_SIZE,))


def unpack_blocks(raw: jax.Array) -> Unpacked:
    """uint8 [..., nb, 210] -> codes -32..31 [..., nb, 256], int8 scales [..., nb, 16], d; no mins."""
    raw = jnp.asarray(raw)
    ks.check_blocks(raw, TYPE_SIZE, "q6_k", "data")
    lead = raw.shape[:-1]
    ql = raw[..., :128].astype(jnp.int32).reshape(lead + (2, 2, 32))            # [.., half, j, i]
    qh = raw[..., 128:192].astype(jnp.int32).reshape(lead + (2, 1, 32))
    low = (ql[..., None, :] >> jnp.array([0, 4], jnp.int32)[:, None]) & 0xF     # [.., half, j, hi, i]
    low = jnp.swapaxes(low, -2, -3).reshape(lead + (2, 4, 32))                  # quarter = 2*hi + j
    high = (qh >> (2 * jnp.arange(4, dtype=jnp.int32))[:, None]) & 3            # [.., half, 4, 32]
    q = (low | (high << 4)).reshape(lead + (BLOCK_SIZE,)) - _NMAX
    scales = lax.bitcast_convert_type(raw[..., 192:208], jnp.int8).astype(jnp.int32)
    return Unpacked(q=q, scales=scales, mins=None, d=f16_from_bytes(raw[..., 208:210]), dmin=None)


def dequantize_blocks(raw: jax.Array) -> jax.Array:
    """uint8 [..., nb, 210] -> float32 [..., nb, 256]: (d*sc)*q as dequantize_row_q6_K.

    Both products are exact in float32 (11 + 7 + 5 bits), so the order cannot change the bits.
    """
    u = unpack_blocks(raw)
    d1 = ks.once(u.d[..., None] * u.scales.astype(F32))
    q = u.q.astype(F32).reshape(u.q.shape[:-1] + (16, 16))
    return (d1[..., None] * q).reshape(u.q.shape)
