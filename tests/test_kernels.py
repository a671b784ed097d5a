"""Pallas kernels (CPU interpreter) against numlab.ops.qmatvec on fresh random inputs: every format,
activation mode and code path (one token, few tokens, dot tiles; column splits, unrolling, stacked
experts), derivatives, the grouped MoE layer against its dense per-pair reference, and bad input."""
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import numlab.formats as formats
from hlo_checks import rounding_pairs
from numlab import kernels, ops
from numlab.formats import QTensor
from numlab.kernels import layouts, moe
from numlab.kernels import qmatmul as qm

RTOL = 1e-5   # of sum |w| |x|: float32 rounding of products and sums in another order
_ref = jax.jit(functools.partial(ops.qmatvec, impl="reference"), static_argnames=("act", "acc"))
_dequantize = jax.jit(lambda w: w.dequantize())


def _rng(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32)


# Byte offsets of the fp16 scale fields inside a block, per format.
_F16_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q8_0": (0,)}


def _weights(rng, fmt, shape):
    """A QTensor of uniformly random block bytes (every code, scale and min pattern), its fp16 scale
    fields set to random finite values in [1e-3, 1e-2)."""
    spec = formats.spec(fmt)
    *lead, rows, cols = shape
    raw = rng.integers(0, 256, (*lead, rows, cols // spec.block_size, spec.type_size), dtype=np.uint8)
    for off in _F16_FIELDS[fmt]:
        half = rng.uniform(1e-3, 1e-2, raw.shape[:-1]).astype(np.float16)
        raw[..., off:off + 2] = half[..., None].view(np.uint8)
    return QTensor.from_bytes(jnp.asarray(raw.reshape(*lead, rows, -1)), fmt, (rows, cols))


def _assert_close(y, ref, w: QTensor, x):
    """|y − ref| ≤ RTOL · (|W| · |x|) elementwise, in float64; y finite and float32."""
    assert y.dtype == jnp.float32 and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    scale = np.einsum("...rc,...c->...r", np.abs(np.asarray(_dequantize(w), np.float64)),
                      np.abs(np.asarray(x, np.float64)))
    err = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
    assert np.all(np.isfinite(np.asarray(y))), "non-finite kernel output"
    assert np.all(err <= RTOL * scale), f"max err/scale {np.max(err / scale):.3g}"


INT_ACT = {"q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k", "q8_0": "q8_0"}
FMTS = ("q4_k", "q5_k", "q6_k", "q8_0")
# (fmt, act, tokens, Config): each format through one token (float and integer paths), integer dot
# tiles (q8_1 on every format, the CPU integer mode on three) and several tokens in its CPU integer
# mode; float dot tiles and bf16 multi-token tiles on two formats each; column splits and unrolling on
# the way (one token in float modes also one value run per lane on q6_k / q8_0, as tuning picks).
# Integer modes below 16 tokens read 32-bit words with byte dot products; the byte path they
# replace (words=False) is checked on q4_k, q6_k and q8_0, loading a chunk ahead (prefetch) on every
# format; integer-mode activations quantized by XLA (x_kernel=False) rather than quantize_x's kernels on three.
# Dot tiles read q4_k / q5_k as words (q8_1: the min term in one dot); their byte path on both, in both
# modes, and their words a chunk ahead. The word kernels with sums per word (lane_sums) on every format; one
# float token on words (float_words).
CASES = ([(f, "f32", 1, qm.Config(rows=8, tokens=1, ksplit=2)) for f in FMTS]
         + [(f, "f32", 1, qm.Config(rows=16, tokens=1, lane_runs=1)) for f in ("q6_k", "q8_0")]
         + [(f, "q8_1", 1, qm.Config(rows=16, tokens=1, unroll=2)) for f in FMTS]
         + [(f, "q8_1", 17, qm.Config(rows=16, tokens=16, ksplit=2)) for f in FMTS]
         + [(f, INT_ACT[f], 17, qm.Config(rows=16, tokens=16)) for f in ("q4_k", "q6_k", "q8_0")]
         + [(f, INT_ACT[f], 2, qm.Config(rows=16, tokens=2)) for f in FMTS]
         + [(f, "f32", 17, qm.Config(rows=16, tokens=16)) for f in ("q4_k", "q6_k")]
         + [(f, "bf16", 3, qm.Config(rows=16, tokens=4, unroll=2)) for f in ("q5_k", "q8_0")]
         + [(f, a, 1, qm.Config(rows=16, tokens=1, words=False)) for f, a in (("q4_k", "q8_1"), ("q4_k", "q8_k"),
                                                                              ("q6_k", "q8_1"), ("q8_0", "q8_0"))]
         + [(f, a, n, qm.Config(rows=16, tokens=n, prefetch=True)) for f, a, n in (("q4_k", "q8_1", 1),
                                                                                 ("q5_k", "q8_k", 2),
                                                                                 ("q6_k", "q8_k", 1),
                                                                                 ("q8_0", "q8_1", 1))]
         + [(f, a, n, qm.Config(rows=16, tokens=n, x_kernel=False)) for f, a, n in (("q4_k", "q8_1", 1),
                                                                                  ("q6_k", "q8_k", 1),
                                                                                  ("q8_0", "q8_0", 2))]
         + [("q5_k", "q8_1", 17, qm.Config(rows=16, tokens=16, x_kernel=False))]
         + [(f, a, 17, qm.Config(rows=16, tokens=16, words=False)) for f, a in (("q4_k", "q8_1"), ("q5_k", "q8_1"),
                                                                               ("q5_k", "q8_k"))]
         + [(f, a, 17, qm.Config(rows=16, tokens=16, prefetch=True)) for f, a in (("q4_k", "q8_k"), ("q5_k", "q8_1"))]
         + [(f, a, n, qm.Config(rows=r, tokens=n, unroll=2, prefetch=True, lane_sums=True, ksplit=k, atomic=k == 2))
            for f, a, n, r, k in (("q4_k", "q8_1", 1, 16, 2), ("q5_k", "q8_1", 1, 32, 1), ("q4_k", "q8_k", 2, 16, 1),
                                  ("q5_k", "q8_k", 1, 32, 2), ("q8_0", "q8_1", 1, 16, 1), ("q8_0", "q8_0", 2, 32, 2),
                                  ("q6_k", "q8_1", 1, 16, 2), ("q6_k", "q8_k", 2, 32, 1))]
         + [(f, a, 1, qm.Config(rows=r, tokens=1, unroll=u, prefetch=u > 1, float_words=True, ksplit=k, atomic=k == 2))
            for f, a, r, u, k in (("q4_k", "f32", 16, 2, 2), ("q5_k", "f32", 32, 1, 1), ("q4_k", "bf16", 16, 1, 1),
                                  ("q5_k", "f16", 16, 2, 1), ("q8_0", "f32", 16, 2, 2), ("q8_0", "bf16", 32, 1, 1),
                                  ("q6_k", "f32", 16, 2, 2), ("q6_k", "bf16", 32, 1, 1))])


def _case_id(fmt, act, n, cfg):
    return (f"{fmt}-{act}-{n}" + ("" if cfg.words else "-bytes") + ("-prefetch" if cfg.prefetch else "")
            + ("" if cfg.x_kernel else "-xla-quantized") + ("-lanes1" if cfg.lane_runs == 1 else "")
            + (f"-ksplit{cfg.ksplit}" if cfg.ksplit > 1 else "") + ("-lane-sums" if cfg.lane_sums else "")
            + ("-float-words" if cfg.float_words else ""))


@pytest.mark.parametrize("fmt,act,n,cfg", CASES, ids=[_case_id(*case) for case in CASES])
def test_kernel_equals_reference(fmt, act, n, cfg):
    rng = _rng(fmt, act, n)
    w = _weights(rng, fmt, (32, 512))
    x = jnp.asarray(rng.standard_normal((n, 512)) * rng.lognormal(0, 1, (n, 1)), jnp.float32)
    y = jax.jit(functools.partial(kernels.qmatvec_fast, act=act, config=cfg, interpret=True))(w, x)
    _assert_close(y, _ref(w, x, act=act), w, x)


@pytest.mark.parametrize("cols,act,cfg", [(768, "q8_1", qm.Config(rows=16, tokens=1)),
                                          (768, "q8_k", qm.Config(rows=16, tokens=2, ksplit=3, prefetch=True)),
                                          (1536, "q8_1", qm.Config(rows=16, tokens=1, ksplit=2, prefetch=True)),
                                          (1536, "q8_k", qm.Config(rows=16, tokens=2, ksplit=2)),
                                          (768, "q8_1", qm.Config(rows=16, tokens=1, lane_sums=True)),
                                          (1536, "q8_k", qm.Config(rows=16, tokens=2, ksplit=2, lane_sums=True)),
                                          (768, "f32", qm.Config(rows=16, tokens=1, float_words=True, prefetch=True)),
                                          (1536, "f32", qm.Config(rows=16, tokens=1, ksplit=2, unroll=3,
                                                                  prefetch=True, float_words=True))])
def test_q6_k_words_in_odd_super_blocks(cols, act, cfg):
    """q6_k's 210-byte super-blocks as words, the odd ones starting mid-word: x shifted to meet them
    where a row holds an even number (here a column split starts on one), the weight words rebuilt
    where it holds an odd number (every second row starts mid-word); bytes for tiles of one row. The
    integer word kernels and one float token on words (float_words)."""
    def reads_words(c):
        return qm.float_words("q6_k", act, c, cols) if act == "f32" else qm.uses_words("q6_k", act, c, cols)
    assert reads_words(cfg)
    assert reads_words(dataclasses.replace(cfg, rows=1)) == (cols % 512 == 0)
    rng = _rng("q6_k-odd", cols, act)
    w = _weights(rng, "q6_k", (16, cols))
    x = jnp.asarray(rng.standard_normal((cfg.tokens, cols)) * 3, jnp.float32)
    y = jax.jit(functools.partial(kernels.qmatvec_fast, act=act, config=cfg, interpret=True))(w, x)
    _assert_close(y, _ref(w, x, act=act), w, x)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
def test_prefetch_of_several_chunks(fmt):
    """One token loading the next two chunks ahead (prefetch with unroll=2) over a column split of four
    chunks: one loop iteration and the last two chunks peeled."""
    cfg = qm.Config(rows=16, tokens=1, ksplit=2, unroll=2, prefetch=True)
    rng = _rng("prefetch-unrolled", fmt)
    w = _weights(rng, fmt, (16, 2048))
    x = jnp.asarray(rng.standard_normal((1, 2048)) * 3, jnp.float32)
    y = jax.jit(functools.partial(kernels.qmatvec_fast, act="q8_1", config=cfg, interpret=True))(w, x)
    _assert_close(y, _ref(w, x, act="q8_1"), w, x)


ATOMIC_CASES = [("q4_k", "q8_1", 1, qm.Config(rows=16, ksplit=2, unroll=2, prefetch=True)),
                ("q8_0", "q8_1", 1, qm.Config(rows=16, ksplit=2, unroll=2, prefetch=True)),
                ("q6_k", "q8_k", 1, qm.Config(rows=16, ksplit=2)),
                ("q4_k", "f32", 1, qm.Config(rows=32, ksplit=2, lane_runs=1)),
                ("q5_k", "q8_1", 3, qm.Config(rows=16, tokens=4, ksplit=2)),
                ("q4_k", "q8_1", 17, qm.Config(rows=16, tokens=16, ksplit=2))]


@pytest.mark.parametrize("fmt,act,n,cfg", ATOMIC_CASES, ids=[_case_id(*case) for case in ATOMIC_CASES])
def test_atomic_split_sums_are_the_split_sums_bit_for_bit(fmt, act, n, cfg):
    """Two column splits adding into zeros (Config.atomic) give the bits of the split sum after the kernel
    (0 + a + b = a + b in either order), through the word, multiply-add and dot-tile paths; the zeros come
    from quantize_x's launch in q8_1 and q8_k (no other launch in the lowered product) and from XLA otherwise. (The
    interpreter adds exactly; the GPU's atomics also flush subnormal sums to zero.)"""
    rng = _rng("atomic", fmt, act, n)
    w = _weights(rng, fmt, (32, 1024))
    x = jnp.asarray(rng.standard_normal((n, 1024)) * 3, jnp.float32)
    run = lambda c: jax.jit(functools.partial(kernels.qmatvec_fast, act=act, config=c, interpret=True))  # noqa: E731
    atomic = dataclasses.replace(cfg, atomic=True)
    y = run(atomic)(w, x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(run(cfg)(w, x)).view(np.uint32))
    _assert_close(y, _ref(w, x, act=act), w, x)
    lowered = jax.jit(functools.partial(kernels.qmatvec_fast, act=act, config=atomic)).trace(w, x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "output_operand_alias" in lowered
    if act in ("q8_1", "q8_k"):
        ops_ = re.findall(r"= stablehlo\.(\w+)", lowered)
        assert ops_.count("custom_call") == 2 and "reduce" not in ops_ and "add" not in ops_, sorted(set(ops_))


def test_atomic_experts_are_the_split_sums_bit_for_bit():
    """The grouped kernel with atomic split sums: the pairs' outputs as without, bit for bit (tiles of
    16 rows, most rows padding)."""
    rng = _rng("atomic-experts")
    experts = _weights(rng, "q4_k", (4, 16, 512))
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    expert = jnp.asarray([2, 0, 2], jnp.int32)
    cfg = qm.Config(rows=16, tokens=16, ksplit=2)
    run = lambda c: jax.jit(functools.partial(kernels.expert_qmatvec_fast, act="q8_1", config=c,  # noqa: E731
                                              interpret=True))(experts, x, expert)
    y = run(dataclasses.replace(cfg, atomic=True))
    chex.assert_shape(y, (3, 16))
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(run(cfg)).view(np.uint32))


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_float_words_in_the_grouped_kernel(fmt):
    """Config.float_words in the MoE layer's grouped kernel (each pair's row read through src): every pair's
    output the reference product with its expert's matrix."""
    rng = _rng("float-words-experts", fmt)
    experts = _weights(rng, fmt, (4, 16, 512))
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    expert = jnp.asarray([2, 0, 2], jnp.int32)
    cfg = qm.Config(rows=16, tokens=1, ksplit=2, unroll=1, prefetch=True, atomic=True, float_words=True)
    y = jax.jit(functools.partial(kernels.expert_qmatvec_fast, act="f32", config=cfg, interpret=True))(
        experts, x, expert)
    chex.assert_shape(y, (3, 16))
    for i, e in enumerate(np.asarray(expert)):
        w = QTensor(experts.data[e], fmt, (16, 512))
        _assert_close(y[i], _ref(w, x[i], act="f32"), w, x[i])


@pytest.mark.parametrize("fmt", FMTS)
def test_one_token_float_kernels_fuse_multiply_adds(fmt):
    """The Triton lowering (done on the CPU) of one token in f32 accumulates by PTX fma.rn.f32 (Pallas'
    Triton path would not contract the product and the sum); several tokens reduce products instead."""
    w = jax.ShapeDtypeStruct((32, formats.row_bytes(fmt, 1024)), jnp.uint8)

    def lowered(n):
        f = lambda d, x: kernels.qmatvec_fast(QTensor(d, fmt, (32, 1024)), x, "f32")  # noqa: E731
        return jax.jit(f).trace(w, jax.ShapeDtypeStruct((n, 1024), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "fma.rn.f32" in lowered(1)
    assert "fma.rn.f32" not in lowered(3)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
def test_integer_dot_tiles_scale_by_fused_multiply_adds(fmt):
    """The Triton lowering (done on the CPU) of the q8_1 dot tiles (17 tokens) adds each group's scaled
    dot by PTX fma.rn.f32."""
    w = jax.ShapeDtypeStruct((64, formats.row_bytes(fmt, 1024)), jnp.uint8)
    f = lambda d, x: kernels.qmatvec_fast(QTensor(d, fmt, (64, 1024)), x, "q8_1")  # noqa: E731
    text = jax.jit(f).trace(w, jax.ShapeDtypeStruct((17, 1024), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("fma.rn.f32") >= 1


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k"])
def test_dot_word_groups_are_the_codecs_fields(fmt):
    """The dot tiles' word decoders give, for every group of a chunk, the codec's codes, 6-bit scale and
    min, d and dmin (numlab.formats.unpack), and dot_word_mins the mins of groups k % 8."""
    rng = _rng("dot-words", fmt)
    w = _weights(rng, fmt, (16, 512))
    u = formats.unpack(w.data, fmt)
    words = jax.lax.bitcast_convert_type(w.data.reshape(-1, 4), jnp.int32)
    row_words, chunk = formats.row_bytes(fmt, 512) // 4, 1
    wb = (jnp.arange(16) * row_words + chunk * layouts.CHUNK_BYTES[fmt] // 4)[:, None, None]
    head, qh, runs = layouts.dot_word_load(fmt, words, wb)
    for g, grp in enumerate(layouts.dot_word_groups(head, qh, runs)):
        chex.assert_shape(grp.codes, (16, 1, 32))
        assert grp.codes.dtype == jnp.int8 and int(grp.g.reshape(())) == g
        np.testing.assert_array_equal(grp.codes[:, 0], u.q[:, chunk, 32 * g:32 * g + 32])
        np.testing.assert_array_equal(grp.isc[:, 0, 0], u.scales[:, chunk, g])
        np.testing.assert_array_equal(grp.imin[:, 0, 0], u.mins[:, chunk, g])
        np.testing.assert_array_equal(grp.d[:, 0, 0], u.d[:, chunk])
        np.testing.assert_array_equal(grp.dmin[:, 0, 0], u.dmin[:, chunk])
    mins = layouts.dot_word_mins(head)
    assert mins.dtype == jnp.bfloat16
    np.testing.assert_array_equal(mins.astype(jnp.int32), np.tile(u.mins[:, chunk], 4))


class MinPlanesTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_split_s_exactly(self):
        """min_planes: per chunk, three bfloat16 parts of each group's s that sum back to s exactly (each
        part 8 of s's 24 significant bits), zeros in rows 24..31; no float32 -> bfloat16 -> float32 round trip
        for XLA:GPU to drop."""
        rng = _rng("min-planes")
        s = rng.standard_normal((48, 5)) * rng.lognormal(0, 8, (48, 5))
        planes = self.variant(qm.min_planes)(jnp.asarray(s, jnp.float32))
        chex.assert_shape(planes, (6, 32, 5))
        assert planes.dtype == jnp.bfloat16
        p = np.asarray(planes, np.float64)
        s32 = np.asarray(np.float32(s), np.float64).reshape(6, 8, 5)
        np.testing.assert_array_equal(p[:, :8] + p[:, 8:16] + p[:, 16:24], s32)
        assert np.all(np.abs(p[:, 8:16]) <= 2.0 ** -7 * np.abs(p[:, :8]))
        assert np.all(p[:, 24:] == 0)
        assert rounding_pairs(jax.jit(qm.min_planes).lower(s.astype(np.float32)).compile().as_text()) == []


def test_default_tiling_batch_axes_and_stacked_weights():
    rng = _rng("batch")
    w = _weights(rng, "q4_k", (16, 256))
    x = jnp.asarray(rng.standard_normal((2, 1, 256)), jnp.float32)
    y = jax.jit(functools.partial(kernels.qmatvec_fast, act="q8_1", interpret=True))(w, x)
    chex.assert_shape(y, (2, 1, 16))
    _assert_close(y, _ref(w, x, act="q8_1"), w, x)
    ws = _weights(rng, "q6_k", (3, 16, 256))                       # experts broadcast against x
    xs = jnp.asarray(rng.standard_normal((2, 1, 256)), jnp.float32)
    ys = jax.jit(functools.partial(kernels.qmatvec_fast, act="f32", interpret=True))(ws, xs)
    chex.assert_shape(ys, (2, 3, 16))
    _assert_close(ys, _ref(ws, xs, act="f32"), ws, jnp.broadcast_to(xs, (2, 3, 256)))


@pytest.mark.parametrize("fmt,act,flag", [("q5_k", "q8_1", "lane_sums"), ("q8_0", "q8_1", "lane_sums"),
                                           ("q4_k", "f32", "float_words"), ("q8_0", "f32", "float_words")])
def test_word_variants_over_stacked_matrices(fmt, act, flag):
    """Config.lane_sums and float_words where one launch multiplies several matrices, one token each (a MoE
    layer's experts at one token), x broadcast against the stack."""
    rng = _rng("lane-sums-stack", fmt, act)
    ws = _weights(rng, fmt, (3, 16, 512))
    xs = jnp.asarray(rng.standard_normal((2, 1, 512)) * 3, jnp.float32)
    cfg = qm.Config(rows=16, tokens=1, unroll=2, prefetch=True, **{flag: True})
    ys = jax.jit(functools.partial(kernels.qmatvec_fast, act=act, config=cfg, interpret=True))(ws, xs)
    chex.assert_shape(ys, (2, 3, 16))
    _assert_close(ys, _ref(ws, xs, act=act), ws, jnp.broadcast_to(xs, (2, 3, 512)))


def test_derivatives_are_the_references():
    """jvp and vjp: the dequantized linear map and its transpose, as numlab.ops.qmatvec's."""
    rng = _rng("grad")
    w = _weights(rng, "q5_k", (16, 256))
    x, t = (jnp.asarray(rng.standard_normal((2, 256)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    fast = functools.partial(kernels.qmatvec_fast, w, act="q8_1", interpret=True)
    ref = functools.partial(ops.qmatvec, w, act="q8_1", impl="reference")
    jvp = jax.jit(lambda f, x, t: jax.jvp(f, (x,), (t,))[1], static_argnums=0)
    vjp = jax.jit(lambda f, x, g: jax.vjp(f, x)[1](g)[0], static_argnums=0)
    chex.assert_trees_all_close(jvp(fast, x, t), jvp(ref, x, t), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(vjp(fast, x, g), vjp(ref, x, g), rtol=1e-6, atol=1e-6)


def test_vmap_folds_into_tokens_and_stacks():
    """Nested vmaps (over x, and over weights and x) equal the reference and keep the kernel's grid
    at three axes (Triton's limit): the batch becomes tokens or stacked matrices, not a grid axis."""
    rng = _rng("vmap")
    w = _weights(rng, "q4_k", (16, 256))
    ws = _weights(rng, "q4_k", (2, 16, 256))
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    fast = functools.partial(kernels.qmatvec_fast, act="f32", interpret=True)
    over_x = jax.vmap(jax.vmap(lambda v: fast(w, v)))
    over_wx = jax.vmap(lambda d, v: jax.vmap(lambda u: fast(QTensor(d, "q4_k", w.shape), u))(v))
    per_x = QTensor(ws.data[:, None], "q4_k", w.shape)             # matrix i against x[i]'s rows
    for f, args, ref, wq in ((over_x, (x,), _ref(w, x, act="f32"), w),
                             (over_wx, (ws.data, x), _ref(ws, x.transpose(1, 0, 2), act="f32").transpose(1, 0, 2),
                              per_x)):
        grids = re.findall(r"grid=\(([^)]*)\)", str(jax.make_jaxpr(f)(*args)))
        assert grids and all(len(g.split(",")) <= 3 for g in grids), grids
        _assert_close(jax.jit(f)(*args), ref, wq, x)


@pytest.mark.parametrize("act,tokens", [("f32", 1), ("q8_1", 1), ("q8_1", 16)])
def test_moe_ffn_equals_dense_reference(act, tokens):
    """Grouped experts = per pair gate/up/down through ops.qmatvec, swiglu, moe_sum (gate and up read
    each token's row for its k pairs in place: row i // k with a tile per pair, by src in 16-row tiles)."""
    rng = _rng("moe", act)
    n_exp, d, ff, t, k = 4, 256, 256, 3, 2
    gate, up = _weights(rng, "q4_k", (n_exp, ff, d)), _weights(rng, "q4_k", (n_exp, ff, d))
    down = _weights(rng, "q6_k", (n_exp, d, ff))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(n_exp, k, replace=False) for _ in range(t)]), jnp.int32)
    wts = jnp.asarray(rng.random((t, k)), jnp.float32)
    y = jax.jit(functools.partial(moe.moe_ffn, act=act, config=qm.Config(rows=64, tokens=tokens), interpret=True))(
        x, idx, wts, gate, up, down)

    @jax.jit
    def dense(x, idx, wts, gate, up, down):
        pick = lambda w: QTensor(w.data[idx], w.fmt, w.shape)
        h = ops.swiglu(ops.qmatvec(pick(gate), x[:, None], act, impl="reference"),
                       ops.qmatvec(pick(up), x[:, None], act, impl="reference"))
        return ops.moe_sum(ops.qmatvec(pick(down), h, act, impl="reference"), wts)

    ref = dense(x, idx, wts, gate, up, down)
    chex.assert_shape(y, (t, d))
    chex.assert_trees_all_close(y, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))), rtol=0)
    if tokens == 1:       # vmap over prompts: the same layer with the prompts' tokens side by side
        layer = functools.partial(moe.moe_ffn, gate=gate, up=up, down=down, act=act,
                                  config=qm.Config(rows=64, tokens=tokens), interpret=True)
        two = jax.jit(jax.vmap(layer))(jnp.stack([x, -x]), jnp.stack([idx, idx[::-1]]), jnp.stack([wts, wts]))
        chex.assert_trees_all_close(two[0], y, atol=1e-5 * float(jnp.max(jnp.abs(ref))), rtol=0)
        chex.assert_trees_all_close(two[1], jax.jit(layer)(-x, idx[::-1], wts), rtol=0,
                                    atol=1e-5 * float(jnp.max(jnp.abs(ref))))


_LOW = {"bf16": jnp.bfloat16, "f16": jnp.float16}


@pytest.mark.parametrize("act", ["bf16", "f16", "q8_1", "q8_0"])
def test_prepared_roundings_survive_excess_precision(act):
    """The kernels' x (bf16, f16) and Q8_1/Q8_0 scales d are the reference's roundings, and the compiled
    preparation holds no f32 -> bf16/f16 -> f32 convert pair that could undo them (on an H100 without
    --xla_allow_excess_precision=false: q8_1 one token off by 4e-5 of |W| |x|, bf16 by 3e-4)."""
    x = jnp.asarray(_rng("prepare", act).standard_normal((3, 512)) * 3, jnp.float32)
    prep = jax.jit(functools.partial(qm.prepare, act=act))
    if act in _LOW:
        got, want = prep(x)[0], x.astype(_LOW[act]).astype(jnp.float32)
    else:
        got, want = prep(x)[1], formats.unpack(formats.quantize(x, act), act).d.reshape(3, -1)
    np.testing.assert_array_equal(got, want)
    assert rounding_pairs(jax.jit(lambda v: v.astype(_LOW["f16"]).astype(jnp.float32)).lower(x).compile().as_text())
    pairs = rounding_pairs(prep.lower(x).compile().as_text())
    assert not pairs, f"convert pairs {pairs} in the compiled qm.prepare(x, {act!r})"


def test_q8_k_preparation_is_the_codecs():
    """prepare(x, "q8_k") (the codec's scale and codes, no bytes) equals the codec's bytes unpacked, and
    its sums are those of each 32 codes, on rows with zeros, ties and a NaN."""
    rng = _rng("prepare-q8_k")
    x = rng.standard_normal((3, 512)).astype(np.float32) * 5
    x[1, :256], x[2, 7], x[2, 300:310] = 0, np.nan, 2.5
    q, d, sums = jax.jit(functools.partial(qm.prepare, act="q8_k"))(jnp.asarray(x))
    u = formats.unpack(formats.quantize(jnp.asarray(x), "q8_k"), "q8_k")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(u.q).reshape(3, 512))
    np.testing.assert_array_equal(np.asarray(d).view(np.uint32), np.asarray(u.d).reshape(3, 2).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(sums), np.asarray(u.q).reshape(3, 16, 32).sum(-1))


def test_errors_name_the_bad_value():
    w = _weights(_rng("err"), "q4_k", (16, 256))
    with pytest.raises(ValueError, match="act='q8_0'.*q8_k, q8_1"):
        kernels.qmatvec_fast(w, jnp.ones(256), "q8_0")
    with pytest.raises(ValueError, match="cols=256"):
        kernels.qmatvec_fast(w, jnp.ones(128), "f32")
    with pytest.raises(TypeError, match="QTensor"):
        kernels.qmatvec_fast(np.ones((16, 256)), jnp.ones(256))
    with pytest.raises(ValueError, match="power of two"):
        qm.Config(rows=12).check()
    with pytest.raises(ValueError, match="dot"):
        qm.Config(dot="tf32").check()
    with pytest.raises(ValueError, match="atomic with ksplit=3"):
        qm.Config(ksplit=3, atomic=True).check()
    assert not kernels.applies(QTensor.from_float(jnp.ones((4, 32)), "q8_0"), "f32", "f32")  # cols % 256
    assert not kernels.applies(w, "f32", "f64")
    experts = _weights(_rng("err-experts"), "q4_k", (4, 16, 256))
    with pytest.raises(ValueError, match=r"x of shape \(3, 256\).*dividing the 4 pairs"):
        kernels.expert_qmatvec_fast(experts, jnp.ones((3, 256)), jnp.zeros(4, jnp.int32))
