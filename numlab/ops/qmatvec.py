"""Matrix-vector products with quantized weights, in the activation modes real engines use.

y[..., r] = sum_c W[..., r, c] · x[..., c], W a QTensor. Batch axes of `w.data` (stacked experts) and
of x broadcast like numpy's matmul. Modes (`act`):

- f64: exact reference: the dequantized weights and x in float64, float64 dot (output float64).
- f32 / bf16 / f16: x rounded to that dtype, the exact dequantized weights, dot with products and sums
  in `acc` (the "dequantize, then float dot" route of CUDA engines and Hugging Face).
- q8_k (q4_k, q5_k, q6_k weights): ggml's CPU route, read from ggml-cpu/quants.c
  (ggml_vec_dot_q{4,5,6}_K_q8_K_generic). x is quantized per 256 to Q8_K (int8 codes, float32 d);
  exact int32 dots of the weight's integer codes with x's codes per sub-block (32 values for
  q4_k/q5_k, 16 for q6_k) are weighted by the integer sub-block scales; q4_k/q5_k subtract the
  integer sum of mins · Q8_K block sums (the sums of x's codes per 32). Then per 256-block
  fl(d_w·d_x)·isum − fl(dmin_w·d_x)·msum in `acc`, summed over blocks.
- q8_1 (q4_k, q5_k, q6_k, q8_0 weights): llama.cpp CUDA mul_mat_vec_q (the few-token kernel), read
  from ggml-cuda/mmvq.cu, vecdotq.cuh (vec_dot_q4_K_q8_1, _q5_K_, _q6_K_, _q8_0_q8_1) and
  quantize.cu (quantize_q8_1). x is quantized to Q8_1 blocks of 32, each with its own fp16 scale
  d8. Per 32-block k of a 256-block: q4_k/q5_k: d_w·sum_k d8_k·(sc_k·dot_k) −
  dmin_w·sum_k d8_k·(m_k·sum(x codes)_k); q6_k: d_w·sum_k d8_k·(sc_2k·dot_2k + sc_2k+1·dot_2k+1)
  (two 16-scales per Q8_1 block); q8_0: sum_k fl(d_w·d8_k)·dot_k. The Q8_1 block sum s (of the
  float inputs) does not enter these dots (the batched mul_mat_q kernel uses it for the min term
  instead). Differences to the GPU, all in float rounding: CUDA splits each block's float sums
  over threads (8 values each) and a warp reduction; x's codes here come from numlab's q8_1 codec
  (ggml's quantize_row_q8_1_ref, x·(1/d)) where CUDA divides x/d — they differ only where x/d
  lies within an ulp of a half-integer.
- q8_0 (q8_0 weights): ggml's CPU vec_dot_q8_0_q8_0: x to Q8_0 blocks of 32, per block
  fl(d_w·d_x)·dot in `acc`, summed over blocks.

In the q8 modes x is rounded to float32 first (engines hold float32 activations). Integer dots are
exact (sub-block dots of the codes in float32, where they are exact integers; int32 beyond); float
dots run at precision=HIGHEST. The derivative with respect to x in every mode is that of the
dequantized linear map (straight-through for the rounding and the activation quantization).
"""
import functools
import math

import jax
import jax.numpy as jnp

import numlab.formats as formats
from numlab.formats import QTensor
from numlab.ops.precision import ACCS, ACTS, check, jdtype, rounded

_HI = jax.lax.Precision.HIGHEST
_FLOAT_ACTS = ("f64", "f32", "bf16", "f16")
_INT_ACTS = {
    "q4_k": ("q8_k", "q8_1"),
    "q5_k": ("q8_k", "q8_1"),
    "q6_k": ("q8_k", "q8_1"),
    "q8_0": ("q8_1", "q8_0"),
}


def acts_for(fmt: str) -> tuple:
    """The activation modes qmatvec supports for weights in format `fmt`."""
    formats.spec(fmt)
    return _FLOAT_ACTS + _INT_ACTS.get(fmt, ())


IMPLS = ("auto", "reference")


def check_modes(fmt: str, act: str, acc: str, what: str = "weights"):
    """ValueError unless act and acc are known and act applies to `what` stored in fmt."""
    check("act", act, ACTS)
    check("acc", acc, ACCS)
    valid = acts_for(fmt)
    if act not in valid:
        raise ValueError(f"act {act!r} does not apply to {fmt} {what}; valid for {fmt}: {', '.join(valid)}")


def qmatvec(w: QTensor, x, act: str = "f32", acc: str = "f32", impl: str = "auto"):
    """y[..., rows] = W · x[..., cols] in mode `act` with `acc` accumulation (output dtype: float64 for
    act f64, else `acc`). Straight-through derivative with respect to x (the dequantized map).
    impl "auto": the Pallas kernel where numlab.kernels.use_for says it runs and pays (a GPU), else
    this module's reference, which impl "reference" always runs."""
    check("impl", impl, IMPLS)
    if not isinstance(w, QTensor):
        raise TypeError(f"qmatvec weights must be a numlab.formats.QTensor, got {type(w).__name__}")
    check_modes(w.fmt, act, acc)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"qmatvec: x of shape {x.shape} must end in cols={w.shape[1]} of the {w.fmt} "
                         f"weight {w.shape}")
    if impl == "auto":
        from numlab import kernels   # numlab.kernels imports numlab.ops
        if kernels.use_for(w, act, acc, n_tokens=math.prod(x.shape[:-1])):
            return kernels.qmatvec_fast(w, x, act, acc, interpret=not kernels.enabled())
    return _qmatvec(act, acc, w, x)


def _out_dtype(act: str, acc: str):
    return jdtype("f64" if act == "f64" else acc)


def _linear(w: QTensor, x, dt):
    """Dequantized W · x with products and sums in dt."""
    return _dot(w.dequantize(), x, dt)


def _dot(wd, x, dt):
    """wd [..., rows, cols] · x [..., cols] with products and sums in dt (HIGHEST precision)."""
    return jnp.einsum("...rc,...c->...r", wd.astype(dt), x.astype(dt), precision=_HI, preferred_element_type=dt)


def prepared(w: QTensor, act: str):
    """What the product in mode act reads of the weights, per matrix of a stack: the dequantized
    float32 values (float modes) or the unpacked codes and scales (formats.Unpacked, integer modes)."""
    return w.dequantize() if act in _FLOAT_ACTS else formats.unpack(w.data, w.fmt)


def product(wp, fmt: str, x, act: str, acc: str):
    """qmatvec's value from prepared(w, act) of weights in format fmt (no derivative rule of its own)."""
    dt = _out_dtype(act, acc)
    if act in _FLOAT_ACTS:
        return _dot(wp, rounded(x, act), dt)
    return _quantized(act, wp, fmt, x, dt)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _qmatvec(act, acc, w, x):
    return product(prepared(w, act), w.fmt, x, act, acc)


@_qmatvec.defjvp
def _qmatvec_jvp(act, acc, primals, tangents):
    w, x = primals
    y = _qmatvec(act, acc, w, x)
    return y, _linear(w, tangents[1], y.dtype)


def _sub_dots(wq, xq, size):
    """Exact int32 dots of codes per sub-block: wq[..., rows, n], xq[..., n] -> [..., rows, n / size].

    Computed as a float32 dot at HIGHEST precision: callers keep |w code| * |x code| * size below
    2**24, so every product and partial sum is an integer float32 holds exactly, in any order and
    with or without FMA. An int8 x int8 -> int32 dot_general has no default GPU config (it fails
    under --xla_gpu_deterministic_ops) and its autotuning took minutes per model compile on an H100.
    """
    wq = wq.reshape(wq.shape[:-1] + (-1, size)).astype(jnp.float32)
    xq = xq.reshape(xq.shape[:-1] + (-1, size)).astype(jnp.float32)
    dots = jnp.einsum("...rsk,...sk->...rs", wq, xq, precision=_HI, preferred_element_type=jnp.float32)
    return dots.astype(jnp.int32)


def _per_block(a, n):
    """[..., m] -> [..., m/n, n]."""
    return a.reshape(a.shape[:-1] + (-1, n))


def _flat(a):
    """[..., nb, k] -> [..., nb * k]."""
    return a.reshape(a.shape[:-2] + (-1,))


def _quantized(act, wu, fmt, x, dt):
    """The integer-dot modes q8_k, q8_1, q8_0 (see the module docstring) on the unpacked weights wu;
    x is rounded to float32 and quantized by numlab's codec for `act`; float scaling and the sum over
    blocks in dt."""
    xu = formats.unpack(formats.quantize(x.astype(jnp.float32), act), act)
    xq, dx = _flat(xu.q), xu.d.astype(dt)[..., None, :]         # [..., cols], [..., 1, x blocks]
    wq, dw = _flat(wu.q), wu.d.astype(dt)                       # [..., rows, cols], [..., rows, nb]
    if fmt == "q8_0":
        return jnp.sum(dw * dx * _sub_dots(wq, xq, 32).astype(dt), axis=-1)
    mins = None                                                  # mins · (sum of x codes) per 32
    if fmt != "q6_k":
        mins = _flat(wu.mins) * jnp.sum(_per_block(xq, 32), axis=-1)[..., None, :]
    if act == "q8_k":                                            # integer sums per 256, then scale
        y = dw * dx * _q8_k_isum(wu, wq, xq).astype(dt)
        if mins is not None:
            y = y - wu.dmin.astype(dt) * dx * jnp.sum(_per_block(mins, 8), axis=-1).astype(dt)
        return jnp.sum(y, axis=-1)
    sub = 256 // wu.scales.shape[-1]                            # 16 (q6_k) or 32 values per scale
    scaled = _flat(wu.scales) * _sub_dots(wq, xq, sub)          # int32 [..., rows, cols / sub], exact
    if fmt == "q6_k":
        scaled = jnp.sum(_per_block(scaled, 32 // sub), axis=-1)  # per 32: two 16-scales
    y = dw * jnp.sum(_per_block(dx * scaled.astype(dt), 8), axis=-1)   # q8_1: d8 per 32 inside the block
    if mins is not None:
        y = y - wu.dmin.astype(dt) * jnp.sum(_per_block(dx * mins.astype(dt), 8), axis=-1)
    return jnp.sum(y, axis=-1)


def _q8_k_isum(wu, wq, xq):
    """Per 256-block the exact integer sum over sub-blocks of scale · (codes · x codes): int32 [..., rows, nb].

    The sub-block scales are folded into the weight codes (|scale·code| <= 4096) and split as
    64·hi + lo (|hi| <= 64, 0 <= lo < 64), so both 256-long dots with x's codes stay below 2**24 and
    are exact in float32 (`_sub_dots`); isum = 64·hi_dot + lo_dot. One number per 256-block, not one
    per sub-block: 8-16x less memory than the per-sub-block dots.
    """
    ws = _flat(jnp.repeat(wu.scales, 256 // wu.scales.shape[-1], axis=-1)) * wq           # int32 [..., rows, cols]
    return (_sub_dots(ws >> 6, xq, 256) << 6) + _sub_dots(ws & 63, xq, 256)
