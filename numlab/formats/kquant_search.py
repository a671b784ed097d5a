"""ggml's k-quant float32 arithmetic in JAX, bit for bit: rounding, ordered sums, the Q4_K/Q5_K scale search.

ggml's reference quantizers (ggml-quants.c) run plain IEEE float32 code in source order with no
fused multiply-add. XLA does two things that change those bits, and this module blocks both:

* On CPU LLVM contracts `a*b + c` into one FMA (one rounding instead of two).
  `mul(a, b, keep)` = `where(keep, a*b, a)`: an add then consumes a select, not a multiply, so
  nothing can be fused; `keep` is data (`x == x`, true for every finite input) that no compiler
  can prove constant, so the select stays. The other arm must be a runtime value: with a constant
  arm, `where(keep, a*b, 0) - where(keep, c*d, 0)` was fused again here (x86 with AVX-512, where
  a select against zero can become a masked multiply). Every product that feeds an add or
  subtract is a `mul`, except products that are exact in float32 (an fp16 value times a small
  integer), where fused and unfused results are the same number. Checked under jit and eager on
  CPU against ggml's bytes; on a GPU the byte tests must be run there.
* XLA's algebraic simplifier rewrites `a / broadcast(b)` into `a * broadcast(1 / b)` (two
  roundings), and XLA:GPU's float32 division is PTX `div.full` (up to 2 ulp off). `div` is
  `div_rn`: a true IEEE division on CPU, an exact integer long division on other backends.
* On an H100 two more differences showed under jit: XLA:GPU's
  float32 sqrt is not correctly rounded (`sqrt_rn` corrects it exactly), and XLA, allowed excess
  precision by default, drops the f32 -> f16 -> f32 round trip of `d` before the codes are
  re-quantized with it (`f16_value` decodes the fp16 bits with integer ops instead). XLA:GPU did
  not contract `a*b + c` there; the `mul` guard is for the CPU.

Sums that ggml accumulates in a loop are spelled out element by element in the same order
(`seq_sum`), never `jnp.sum`. The searches keep the summed element axis first and the blocks on
the minor axis, where XLA's CPU loops vectorise; codes are then computed and packed in the
input's own layout, so no large transpose is left at the end.
"""
import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from numlab.formats._common import div_rn, f16_value, once, sqrt_rn

F32 = jnp.float32
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(v) in the low mantissa bits
GROUP_MAX_EPS = np.float32(1e-15)


def mul(a: jax.Array, b: jax.Array, keep: jax.Array) -> jax.Array:
    """float32 a*b rounded on its own: an add consuming it cannot fuse it into an FMA (`keep` all true)."""
    return jnp.where(keep, a * b, a)


div = div_rn


def nearest_int(v: jax.Array) -> jax.Array:
    """ggml's nearest_int: int32 from the low mantissa bits of fl(v + 1.5*2**23) (round half to even).

    `v` must not be a bare product (use `mul`) so that the add is not fused with it.
    """
    bits = lax.bitcast_convert_type(v + _MAGIC, jnp.int32)
    return (bits & 0x7FFFFF) - 0x400000


def seq_sum(terms: jax.Array, start=None) -> jax.Array:
    """float32 sum over axis 0 in index order, ((start + t0) + t1) + ...; start defaults to 0.0."""
    acc = jnp.zeros(terms.shape[1:], F32) if start is None else start
    for i in range(terms.shape[0]):
        acc = acc + terms[i]
    return acc


def seq_max(values: jax.Array) -> jax.Array:
    """ggml's running maximum over axis 0 starting at 0: `if (v > m) m = v`."""
    m = jnp.zeros(values.shape[1:], F32)
    for i in range(values.shape[0]):
        m = jnp.where(values[i] > m, values[i], m)
    return m


def levels(iscale, x, offset, keep, nmax: int) -> jax.Array:
    """clamp(nearest_int(iscale * (x - offset)), 0, nmax) as int32."""
    return jnp.clip(nearest_int(mul(iscale, x - offset, keep)), 0, nmax)


def _weighted_sq_error(scale, xmin, lf, x, w, keep) -> jax.Array:
    """sum_i w_i * (scale*l_i + min - x_i)**2 in ggml's order and roundings (float32)."""
    diff = (mul(scale, lf, keep) + xmin) - x
    return seq_sum(mul(w, diff * diff, keep))


def make_qkx2_quants(x, w, keep, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants (use_mad=false) on columns x[n, ...] with weights w[n, ...].

    Starts from the levels of nmax / (max - min), then tries the inverse scales
    (rmin + rdelta*is + nmax) / (max - min) for is = 0..nstep in order, fitting scale and min by
    weighted least squares for each and keeping a candidate when its weighted squared error is
    strictly smaller. As in ggml, an accepted candidate's min replaces `min` for all later
    candidates, so the candidates run in sequence (a scan); each step is vectorised over columns.
    Returns float32 [...] (scale, the_min, iscale, offset): ggml's codes are
    `levels(iscale, x, offset, keep, nmax)` (iscale is 0 where ggml's codes are all 0).
    """
    xmin = jnp.min(x, axis=0)
    xmax = jnp.max(x, axis=0)
    sum_w = seq_sum(w[1:], w[0])
    sum_x = seq_sum(mul(w[1:], x[1:], keep[1:]), mul(w[0], x[0], keep[0]))
    xmin = jnp.where(xmin > 0, F32(0), xmin)
    flat = xmax == xmin
    kb = keep[0]  # a per-column mask for column-level products
    iscale0 = div(F32(nmax), xmax - xmin)
    scale0 = div(F32(1), iscale0)
    best0 = _weighted_sq_error(scale0, xmin, levels(iscale0, x, xmin, keep, nmax).astype(F32), x, w, keep)

    def step(carry, numer):
        best, scale, mn, iscale_sel, min_sel = carry
        iscale = div(numer, xmax - mn)
        lf = levels(iscale, x, mn, keep, nmax).astype(F32)
        wl = mul(w, lf, keep)
        sum_l = once(seq_sum(wl))
        sum_l2 = once(seq_sum(mul(wl, lf, keep)))
        sum_xl = once(seq_sum(mul(wl, x, keep)))
        det = mul(sum_w, sum_l2, kb) - mul(sum_l, sum_l, kb)
        this_scale = div(mul(sum_w, sum_xl, kb) - mul(sum_x, sum_l, kb), det)
        this_min = div(mul(sum_l2, sum_x, kb) - mul(sum_l, sum_xl, kb), det)
        clamp = this_min > 0
        this_scale = jnp.where(clamp, div(sum_xl, sum_l2), this_scale)
        this_min = jnp.where(clamp, F32(0), this_min)
        cur = once(_weighted_sq_error(this_scale, this_min, lf, x, w, keep))
        take = (det > 0) & (cur < best)
        return (jnp.where(take, cur, best), jnp.where(take, this_scale, scale),
                jnp.where(take, this_min, mn), jnp.where(take, iscale, iscale_sel),
                jnp.where(take, mn, min_sel)), None

    # Candidate numerators in ggml's float32 order: (rmin + rdelta*is) + nmax.
    steps = np.arange(nstep + 1, dtype=np.float32)
    numers = (np.float32(rmin) + np.float32(rdelta) * steps) + np.float32(nmax)
    init = (best0, scale0, xmin, iscale0, xmin)
    (_, scale, mn, iscale, offset), _ = lax.scan(step, init, jnp.asarray(numers))
    return (jnp.where(flat, F32(0), scale), -jnp.where(flat, xmin, mn),
            jnp.where(flat, F32(0), iscale), offset)


def quantize_super_blocks(x: jax.Array, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K super-block quantization of x[m, 256] float32 (quantize_row_q{4,5}_K_ref).

    Returns (head uint8 [m, 16]: fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales and mins;
    L int32 [m, 256] codes in 0..nmax).
    """
    m = x.shape[0]
    xs = once(x.reshape(m, 8, 32).transpose(2, 1, 0))  # [32, 8, m]: element axis first
    keep = xs == xs
    kb = keep[0]
    av_x = sqrt_rn(div(seq_sum(mul(xs, xs, keep)), F32(32)))
    w = av_x + jnp.abs(xs)
    scales, mins, iscale, offset = make_qkx2_quants(xs, w, keep, nmax, rmin, 0.1, nstep)

    max_scale = seq_max(scales)
    max_min = seq_max(mins)
    inv_scale = jnp.where(max_scale > 0, div(F32(63), max_scale), F32(0))
    inv_min = jnp.where(max_min > 0, div(F32(63), max_min), F32(0))
    # ggml stores nearest_int into a uint8 (mod 256) before MIN(63, .)
    ls = jnp.minimum(63, nearest_int(mul(inv_scale, scales, kb)) & 0xFF)
    lm = jnp.minimum(63, nearest_int(mul(inv_min, mins, kb)) & 0xFF)
    d16 = div(max_scale, F32(63)).astype(jnp.float16)
    dmin16 = div(max_min, F32(63)).astype(jnp.float16)

    # The codes, in the input's own layout [m, 8, 32]: re-quantized with the rounded scales,
    # except where ggml skips a sub-block whose scale is 0 and keeps the search's codes.
    # d*ls and dmin*lm are exact (fp16 times 6 bits). Per-sub-block values are materialised
    # ([m, 8], `once`) before they are broadcast.
    xn = x.reshape(m, 8, 32)
    keep_n = xn == xn
    dj = once(f16_value(d16)[:, None] * ls.T.astype(F32))[..., None]
    dmj = once(f16_value(dmin16)[:, None] * lm.T.astype(F32))[..., None]
    searched = levels(once(iscale.T)[..., None], xn, once(offset.T)[..., None], keep_n, nmax)
    requant = jnp.clip(nearest_int(div(xn + dmj, dj)), 0, nmax)
    codes = jnp.where(dj != 0, requant, searched).reshape(m, 256)

    packed = jnp.concatenate([
        ls[:4] | ((ls[4:] >> 4) << 6),
        lm[:4] | ((lm[4:] >> 4) << 6),
        (ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4),
    ]).astype(jnp.uint8).T  # [m, 12]
    head = jnp.concatenate([
        lax.bitcast_convert_type(d16, jnp.uint8),
        lax.bitcast_convert_type(dmin16, jnp.uint8),
        packed,
    ], axis=-1)
    return head, codes


def unpack_scales(packed: jax.Array):
    """12 packed bytes [..., 12] -> (scales, mins) int32 [..., 8] (ggml's get_scale_min_k4)."""
    q = packed.astype(jnp.int32)
    lo, hi = q[..., 0:4], q[..., 4:8]
    mix = q[..., 8:12]
    scales = jnp.concatenate([lo & 63, (mix & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mins = jnp.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return scales, mins


def check_blocks(a: jax.Array, last: int, fmt: str, what: str) -> None:
    """ValueError unless `a` has shape [..., nb, last]."""
    if a.ndim < 2 or a.shape[-1] != last:
        raise ValueError(f"{fmt} {what} must have shape [..., nb, {last}], got {a.shape}")


def dequantize_with_mins(u) -> jax.Array:
    """Q4_K/Q5_K values (d*sc)*q - dmin*m, float32 [..., nb, 256], from their Unpacked fields.

    d*sc and (d*sc)*q are exact in float32 (11 + 6 + 5 bits at most), so a fused multiply-subtract
    gives the same bits as ggml's two roundings in dequantize_row_q{4,5}_K.
    """
    d1 = once(u.d[..., None] * u.scales.astype(F32))
    m1 = once(u.dmin[..., None] * u.mins.astype(F32))
    q = u.q.astype(F32).reshape(u.q.shape[:-1] + (8, 32))
    return (d1[..., None] * q - m1[..., None]).reshape(u.q.shape)


def mark_non_finite(blocks: jax.Array, x: jax.Array, marker) -> jax.Array:
    """blocks uint8 [m, type_size] with the bytes `marker` where x[m, 256] holds a NaN or an infinity."""
    bad = ~jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.where(bad[:, None], jnp.asarray(marker, jnp.uint8), blocks)
