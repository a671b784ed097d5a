"""Q8_1 / Q8_0 and Q8_K quantization of activation rows as one Pallas (Triton) kernel each.

The kernels' integer modes q8_1 and q8_0 take x as the codec's codes, fp16 scales d and d times the
sum of each group's codes (numlab.kernels.qmatmul.prepare). In XLA that is four to five fusions
(about 5 us on an H100 for one token: as long as a third of the product); here it is one launch,
bit for bit the same values: ggml's amax (a NaN resets it), d = amax / 127 and 1 / d correctly
rounded (PTX div.rn), codes roundf(x / d) with non-finite values 0, d rounded to fp16 and read back
from its bits. q8_k (numlab.formats.q8_k): per block of 256 the first x of largest |x| (NaNs skipped),
iscale = -127 / max and d = 1 / iscale correctly rounded, codes min(127, x · iscale rounded half to
even) with non-finite products 0, and the int32 sums of each 32 codes.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from numlab.formats._common import div_rn, f16_value

GROUP = 32
BLOCK = 256                        # a Q8_K block: 8 groups
CODES = ("int8", "words", "f32")   # the codes as int8 [P, K], int32 words of 4 codes [P, K / 4], float32 [P, K]
_WORD, _BYTE = 8, 4                # a group as [8 words, 4 bytes]


def groups_per_program(cols: int) -> int:
    """Groups of 32 columns one program quantizes: the largest of 16, 8, 4, 2, 1 dividing the row (one
    row of 14336 / 2048 columns on an H100: 1.39 / 1.38 us at 16 against 1.78 / 1.82 at 64 and 1.47 /
    1.44 at 8, numlab.bench.matvec.quantize_x_sweep)."""
    n = cols // GROUP
    return next(g for g in (16, 8, 4, 2, 1) if n % g == 0)


def q8_blocks(x, codes: str = "int8", *, interpret: bool = False, per: int | None = None,
              group_major: bool = False, zeros: int = 0):
    """x float32 [P, K] (K a multiple of 32) -> (codes, d float32 [P, K / 32], d · sum of the group's
    codes float32 [P, K / 32]), codes as CODES says, equal to qmatmul.prepare(x, "q8_1")'s; per groups
    of 32 values per program (default groups_per_program); group_major: d and the sums as [K / 32, P];
    zeros > 0: a fourth output, float32 [zeros] of zeros written by the same launch (a product's
    output for its atomic adds)."""
    _check(x, codes, GROUP, zeros)
    x = jnp.asarray(x)
    n_groups = x.shape[1] // GROUP
    per = per or groups_per_program(x.shape[1])
    if n_groups % per:
        raise ValueError(f"q8_blocks: per={per} groups per program must divide the row's {n_groups} groups")
    return _launch(x, codes, per, interpret=interpret, group_major=group_major, zeros=zeros, scheme="q8_1")


def q8_k_blocks(x, codes: str = "int8", *, interpret: bool = False, group_major: bool = False, zeros: int = 0):
    """x float32 [P, K] (K a multiple of 256) -> (codes, d float32 [P, K / 256], int32 sums of each 32
    codes [P, K / 32]), equal to qmatmul.prepare(x, "q8_k")'s; codes, group_major and zeros as
    q8_blocks'. One block per program."""
    _check(x, codes, BLOCK, zeros)
    return _launch(jnp.asarray(x), codes, BLOCK // GROUP, interpret=interpret, group_major=group_major, zeros=zeros,
                   scheme="q8_k")


def _check(x, codes, multiple, zeros):
    if codes not in CODES:
        raise ValueError(f"quantize_x: codes={codes!r}; valid: {', '.join(CODES)}")
    shape = jnp.shape(x)
    if len(shape) != 2 or shape[1] % multiple:
        raise ValueError(f"quantize_x: x of shape {shape} must be [rows, cols] with cols a multiple of {multiple}")
    if zeros < 0:
        raise ValueError(f"quantize_x: zeros={zeros} must be >= 0")


def _launch(x, codes, per, *, interpret, group_major, zeros, scheme):
    """One program per `per` groups of a row: codes, scales (per group, or per block for q8_k), sums and the
    zeros, as q8_blocks / q8_k_blocks return them."""
    rows, cols = x.shape
    n_groups = cols // GROUP
    n_scales = n_groups if scheme == "q8_1" else cols // BLOCK
    code_shape = {"int8": ((rows * cols,), jnp.int8), "words": ((rows * cols // _BYTE,), jnp.int32),
                  "f32": ((rows * cols,), jnp.float32)}[codes]
    grid = (rows, n_groups // per)
    zero_span = _pow2_at_least(-(-zeros // (grid[0] * grid[1])))
    out_shape = (jax.ShapeDtypeStruct(*code_shape), jax.ShapeDtypeStruct((rows * n_scales,), jnp.float32),
                 jax.ShapeDtypeStruct((rows * n_groups,), jnp.float32 if scheme == "q8_1" else jnp.int32))
    out_shape += (jax.ShapeDtypeStruct((zeros,), jnp.float32),) if zeros else ()
    q, d, s, *z = pl.pallas_call(
        lambda *refs: _kernel(*refs, cols=cols, per=per, codes=codes, interpret=interpret,
                              group_major=group_major, zeros=zeros, zero_span=zero_span, scheme=scheme),
        out_shape=out_shape,
        grid=grid,
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="quantize_x_q8" if scheme == "q8_1" else "quantize_x_q8_k",
    )(x.astype(jnp.float32).reshape(-1))
    major = (lambda n: (n, rows)) if group_major else (lambda n: (rows, n))
    return (q.reshape(rows, -1), d.reshape(major(n_scales)), s.reshape(major(n_groups))) + tuple(z)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _div(a, b, interpret: bool):
    """float32 a / b rounded to nearest even: PTX div.rn on the GPU, numlab's div_rn in the interpreter."""
    a, b = jnp.broadcast_arrays(a, b)
    if interpret:
        return div_rn(a, b)
    (out,) = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r",
                                          pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def _max12(a):
    """max over axes 1 and 2 of [G, 8, 4], kept as [G, 1, 1] (Triton reduces one axis at a time)."""
    return jnp.max(jnp.max(a, axis=2, keepdims=True), axis=1, keepdims=True)


def _all(reduce, a):
    """reduce over every axis of [G, 8, 4], kept as [1, 1, 1]."""
    return reduce(reduce(reduce(a, axis=2, keepdims=True), axis=1, keepdims=True), axis=0, keepdims=True)


def _q8_1(v, pos, interpret):
    """A program's groups [G, 8, 4] -> (int32 codes, fp16 d per group [G, 1, 1], d · Σ codes per group)."""
    last_nan = _max12(jnp.where(jnp.isnan(v), pos, -1))          # ggml_amax: a NaN restarts the running max
    amax = _max12(jnp.where(pos > last_nan, jnp.abs(v), 0.0))
    amax = jnp.where(last_nan == GROUP - 1, jnp.nan, amax)
    d = _div(amax, jnp.float32(127), interpret)
    inv = jnp.where(d != 0, _div(jnp.float32(1), d, interpret), 0.0)
    r = v * inv
    mag = jnp.abs(r)
    whole = jnp.floor(mag)
    rounded = whole + jnp.where(mag - whole >= 0.5, 1.0, 0.0)   # roundf: halves away from zero
    q = jnp.where(jnp.isfinite(r), jnp.where(r < 0, -rounded, rounded), 0.0).astype(jnp.int32)
    dh = f16_value(d.astype(jnp.float16))
    return q, dh, dh * _group_sums(q).astype(jnp.float32)


def _q8_k(v, pos, interpret):
    """A block [8, 8, 4] -> (int32 codes, d [1, 1, 1], int32 Σ codes per group [8, 1, 1])."""
    amax = _all(jnp.max, jnp.where(jnp.isnan(v), 0.0, jnp.abs(v)))
    block = GROUP * _iota((BLOCK // GROUP, 1, 1), 0) + pos
    first_pos = _all(jnp.min, jnp.where(v == amax, block, BLOCK))
    first_neg = _all(jnp.min, jnp.where(v == -amax, block, BLOCK))
    zero = amax == 0
    mx = jnp.where(zero, 1.0, jnp.where(first_pos < first_neg, amax, -amax))
    iscale = jnp.where(zero, 0.0, _div(jnp.float32(-127), mx, interpret))
    p = iscale * v
    mag = jnp.abs(p)
    whole = jnp.floor(mag)
    frac = mag - whole
    odd = whole - 2 * jnp.floor(whole * 0.5) == 1
    rounded = whole + jnp.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)   # half to even
    q = jnp.where(jnp.isfinite(p), jnp.minimum(jnp.where(p < 0, -rounded, rounded), 127.0), 0.0).astype(jnp.int32)
    d = jnp.where(zero, 0.0, _div(jnp.float32(1), jnp.where(zero, 1.0, iscale), interpret))
    return q, d, _group_sums(q)


def _group_sums(q):
    return jnp.sum(jnp.sum(q, axis=2, keepdims=True), axis=1, keepdims=True)


def _kernel(x_ref, q_ref, d_ref, s_ref, *z_ref, cols, per, codes, interpret, group_major, zeros, zero_span,
            scheme):
    row, blk = pl.program_id(0), pl.program_id(1)
    if zeros:                               # this program's share of the zeros (past the end: the last one again)
        at = (row * pl.num_programs(1) + blk) * zero_span + _iota((zero_span,), 0)
        z_ref[0][jnp.minimum(at, zeros - 1)] = jnp.zeros((zero_span,), jnp.float32)
    g = blk * per + _iota((per, 1, 1), 0)                       # group of the row
    word, byte = _iota((1, _WORD, 1), 1), _iota((1, 1, _BYTE), 2)
    pos = _BYTE * word + byte                                    # value 0..31 in its group
    v = x_ref[row * cols + GROUP * g + pos]
    q, d, sums = (_q8_1 if scheme == "q8_1" else _q8_k)(v, pos, interpret)
    at = g * pl.num_programs(0) + row if group_major else row * (cols // GROUP) + g
    s_ref[at] = sums
    if scheme == "q8_1":
        d_ref[at] = d
    else:
        one = _iota((1, 1, 1), 0)
        d_ref[one + (blk * pl.num_programs(0) + row if group_major else row * pl.num_programs(1) + blk)] = d
    if codes == "words":
        packed = jnp.sum((q & 0xFF) << (8 * byte), axis=2, keepdims=True)   # disjoint bytes: the sum is an or
        q_ref[row * (cols // _BYTE) + _WORD * g + word] = packed
    else:
        q_ref[row * cols + GROUP * g + pos] = q.astype(q_ref.dtype)
