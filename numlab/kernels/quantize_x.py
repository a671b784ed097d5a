"""Q8_1 / Q8_0 quantization of activation rows as one Pallas (Triton) kernel.

The kernels' integer modes q8_1 and q8_0 take x as the codec's codes, fp16 scales d and d times the
sum of each group's codes (numlab.kernels.qmatmul.prepare). In XLA that is four to five fusions
(about 5 us on an H100 for one token: as long as a third of the product); here it is one launch,
bit for bit the same values: ggml's amax (a NaN resets it), d = amax / 127 and 1 / d correctly
rounded (PTX div.rn), codes roundf(x / d) with non-finite values 0, d rounded to fp16 and read back
from its bits.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from numlab.formats._common import div_rn, f16_value

GROUP = 32
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
    if codes not in CODES:
        raise ValueError(f"q8_blocks: codes={codes!r}; valid: {', '.join(CODES)}")
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] % GROUP:
        raise ValueError(f"q8_blocks: x of shape {x.shape} must be [rows, cols] with cols a multiple of {GROUP}")
    rows, cols = x.shape
    n_groups = cols // GROUP
    per = per or groups_per_program(cols)
    if n_groups % per:
        raise ValueError(f"q8_blocks: per={per} groups per program must divide the row's {n_groups} groups")
    if zeros < 0:
        raise ValueError(f"q8_blocks: zeros={zeros} must be >= 0")
    code_shape = {"int8": ((rows * cols,), jnp.int8), "words": ((rows * cols // _BYTE,), jnp.int32),
                  "f32": ((rows * cols,), jnp.float32)}[codes]
    grid = (rows, n_groups // per)
    zero_span = _pow2_at_least(-(-zeros // (grid[0] * grid[1])))
    out_shape = (jax.ShapeDtypeStruct(*code_shape), jax.ShapeDtypeStruct((rows * n_groups,), jnp.float32),
                 jax.ShapeDtypeStruct((rows * n_groups,), jnp.float32))
    out_shape += (jax.ShapeDtypeStruct((zeros,), jnp.float32),) if zeros else ()
    q, d, ds, *z = pl.pallas_call(
        lambda *refs: _kernel(*refs, cols=cols, per=per, codes=codes, interpret=interpret,
                              group_major=group_major, zeros=zeros, zero_span=zero_span),
        out_shape=out_shape,
        grid=grid,
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="quantize_x_q8",
    )(x.astype(jnp.float32).reshape(-1))
    scale_shape = (n_groups, rows) if group_major else (rows, n_groups)
    return (q.reshape(rows, -1), d.reshape(scale_shape), ds.reshape(scale_shape)) + tuple(z)


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


def _kernel(x_ref, q_ref, d_ref, s_ref, *z_ref, cols, per, codes, interpret, group_major, zeros, zero_span):
    row, blk = pl.program_id(0), pl.program_id(1)
    if zeros:                               # this program's share of the zeros (past the end: the last one again)
        at = (row * pl.num_programs(1) + blk) * zero_span + _iota((zero_span,), 0)
        z_ref[0][jnp.minimum(at, zeros - 1)] = jnp.zeros((zero_span,), jnp.float32)
    g = blk * per + _iota((per, 1, 1), 0)                       # group of the row
    word, byte = _iota((1, _WORD, 1), 1), _iota((1, 1, _BYTE), 2)
    pos = _BYTE * word + byte                                    # value 0..31 in its group
    v = x_ref[row * cols + GROUP * g + pos]
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
    sums = jnp.sum(jnp.sum(q, axis=2, keepdims=True), axis=1, keepdims=True)
    dh = f16_value(d.astype(jnp.float16))
    at = g * pl.num_programs(0) + row if group_major else row * (cols // GROUP) + g
    d_ref[at] = dh
    s_ref[at] = dh * sums.astype(jnp.float32)
    if codes == "words":
        packed = jnp.sum((q & 0xFF) << (8 * byte), axis=2, keepdims=True)   # disjoint bytes: the sum is an or
        q_ref[row * (cols // _BYTE) + _WORD * g + word] = packed
    else:
        q_ref[row * cols + GROUP * g + pos] = q.astype(q_ref.dtype)
