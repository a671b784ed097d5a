"""numlab.kernels.quantize_x (Pallas' CPU interpreter): ggml's Q8_1 and Q8_K codes and scales, and bit for
bit the XLA preparation they replace (qmatmul.prepare) on rows with NaN, infinities, zeros and ties."""
import functools
import itertools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import ggml_oracle
from numlab.kernels import qmatmul as qm
from numlab.kernels import quantize_x as qx

_Q8_1 = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])
_Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])


def _bits(a):
    return np.asarray(a).view(np.uint8)


def _special_rows():
    """Three rows of 1024: NaN first, in the middle and last of groups; infinities; a zero group;
    ties x / d = k + 1/2 (d = 1); subnormals; and Gaussian values at three scales."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 1024)) * np.array([[3.0], [1e-3], [4e4]])).astype(np.float32)
    x[0, 0], x[0, 47], x[0, 95], x[0, 200:204] = np.nan, np.nan, np.nan, [np.inf, -np.inf, 1, 2]
    x[1, 64:96] = 0
    x[1, 96:128] = 1e-40
    x[2, :32] = np.arange(32) - 15.5
    x[2, 31] = 127
    return jnp.asarray(x)


def _as(codes, q):
    """prepare's int8 codes in quantize_x's form `codes`."""
    if codes == "words":
        return jax.lax.bitcast_convert_type(q.reshape(q.shape[0], -1, 4), jnp.int32)
    return q.astype(jnp.float32) if codes == "f32" else q


def _assert_every_form_is_prepares(variant, quantize, act, x, majors):
    """quantize(x) in every code form (and scale order in majors) has the bits of prepare(x, act)."""
    want = qm.prepare(x, act)
    rows, cols = x.shape
    for codes, major in itertools.product(qx.CODES, majors):
        got = variant(functools.partial(quantize, codes=codes, interpret=True, group_major=major))(x)
        scales = [(a.shape[1], rows) if major else a.shape for a in want[1:]]
        chex.assert_shape(got, [(rows, cols // 4 if codes == "words" else cols)] + scales)
        for g, w in zip(got, (_as(codes, want[0]),) + tuple(a.T if major else a for a in want[1:])):
            np.testing.assert_array_equal(_bits(g), _bits(w))


class TestEqualsPrepare(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_code_form(self):
        _assert_every_form_is_prepares(self.variant, qx.q8_blocks, "q8_1", _special_rows(), (False,))

    def test_groups_per_program_do_not_change_a_bit(self):
        x = _special_rows()
        want = qm.prepare(x, "q8_1")
        for per in (1, 4, 32):
            got = jax.jit(functools.partial(qx.q8_blocks, codes="int8", interpret=True, per=per))(x)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(_bits(g), _bits(w))

    def test_group_major_scales_are_the_transpose(self):
        x = _special_rows()
        want = qm.prepare(x, "q8_1")
        got = jax.jit(functools.partial(qx.q8_blocks, interpret=True, per=2, group_major=True))(x)
        chex.assert_shape(got[1], (x.shape[1] // 32, x.shape[0]))
        for g, w in zip(got, (want[0], want[1].T, want[2].T)):
            np.testing.assert_array_equal(_bits(g), _bits(w))

    def test_zeros_beside_the_codes(self):
        """zeros=n adds float32 [n] of zeros (fewer or more than the programs' lanes) and changes no bit
        of the other outputs."""
        x = _special_rows()
        want = qx.q8_blocks(x, interpret=True)
        for n in (1, 7, 96, 5000):
            *got, z = jax.jit(functools.partial(qx.q8_blocks, interpret=True, zeros=n))(x)
            chex.assert_shape(z, (n,))
            np.testing.assert_array_equal(_bits(z), np.zeros(4 * n, np.uint8))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(_bits(g), _bits(w))

    def test_ties_round_away_from_zero(self):
        x = _special_rows()
        q, d, _ = jax.jit(functools.partial(qx.q8_blocks, interpret=True))(x)
        assert float(d[2, 0]) == 1.0
        np.testing.assert_array_equal(np.asarray(q[2, :4]), [-16, -15, -14, -13])
        np.testing.assert_array_equal(np.asarray(q[2, 15:17]), [-1, 1])


def _normal_scales(x, block):
    """Whether every block's d (about its largest |x| / 127) is 0 or a normal float32: XLA on the CPU
    flushes subnormals to zero and ggml's C does not (numlab.formats.q8_k)."""
    amax = np.abs(x.reshape(-1, block)).max(axis=1)
    return bool(np.all((amax == 0) | (amax >= 2.0 ** -118)))


def _q8_k_rows():
    """_special_rows and their mirror image negated (blocks whose first largest |x| is negative), a block
    of ties for q8_k (its first largest |x| is -127, iscale = 1, the rest k + 1/2 and -(k + 1/2)) and one
    whose largest |x| comes as -1 then +1 (codes -127 and 127)."""
    x = _special_rows()
    ties = np.concatenate([[-127.0], np.arange(255) % 16 - 7.5]).astype(np.float32)
    ties[1::2] *= -1
    x = jnp.concatenate([x, -x[:, ::-1]], axis=1)
    return x.at[0, :256].set(ties).at[1, 256:258].set(np.float32([-1, 1]))


class TestQ8KEqualsPrepare(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_code_form_and_scale_order(self):
        _assert_every_form_is_prepares(self.variant, qx.q8_k_blocks, "q8_k", _q8_k_rows(), (False, True))

    def test_ties_round_half_to_even_and_zeros_beside(self):
        x = _q8_k_rows()
        q, d, sums, z = jax.jit(functools.partial(qx.q8_k_blocks, interpret=True, zeros=9))(x)
        assert float(d[0, 0]) == 1.0
        np.testing.assert_array_equal(np.asarray(q[0, :6]), [-127, 8, -6, 6, -4, 4])
        np.testing.assert_array_equal(np.asarray(q[1, 256:258]), [-127, 127])
        np.testing.assert_array_equal(np.asarray(sums[0, :2]), np.asarray(q[0, :64]).reshape(2, 32).sum(1))
        np.testing.assert_array_equal(np.asarray(z), np.zeros(9, np.float32))


@given(hnp.arrays(np.float32, (2, 512), elements=st.floats(-1e6, 1e6, width=32)), st.integers(-20, 20))
def test_q8_k_codes_and_scales_are_ggmls(x, exponent):
    """Q8_K codes, float32 scales d and sums of 16 codes (pairs of them: our sums of 32) equal ggml's
    quantize_row_q8_K (where d is not subnormal)."""
    x = x * np.float32(2.0 ** exponent)
    assume(_normal_scales(x, 256))
    q, d, sums = jax.jit(functools.partial(qx.q8_k_blocks, interpret=True))(jnp.asarray(x))
    blocks = ggml_oracle.quantize(x, "q8_k").view(_Q8_K)
    np.testing.assert_array_equal(np.asarray(q).reshape(2, 2, 256), blocks["qs"])
    np.testing.assert_array_equal(_bits(d), _bits(np.ascontiguousarray(blocks["d"]).reshape(2, 2)))
    bsums = blocks["bsums"].astype(np.int32).reshape(2, 2, 8, 2).sum(-1).reshape(2, 16)
    np.testing.assert_array_equal(np.asarray(sums), bsums)


@given(hnp.arrays(np.float32, (2, 256), elements=st.floats(-1e6, 1e6, width=32)), st.integers(-20, 20))
def test_codes_and_scales_are_ggmls(x, exponent):
    """Q8_1 codes and fp16 scales d equal ggml's quantize_row_q8_1_ref (the sums s, ggml's fp16 of
    unrounded d times the sum, are not what the kernels read), where d is not subnormal."""
    x = x * np.float32(2.0 ** exponent)
    assume(_normal_scales(x, 32))
    q, d, _ = jax.jit(functools.partial(qx.q8_blocks, interpret=True))(jnp.asarray(x))
    blocks = ggml_oracle.quantize(x, "q8_1").view(_Q8_1)
    np.testing.assert_array_equal(np.asarray(q).reshape(2, 8, 32), blocks["qs"])
    np.testing.assert_array_equal(np.asarray(d), blocks["d"].astype(np.float32))


def test_gpu_lowering_divides_correctly_rounded():
    """The Triton lowerings (done on the CPU) divide by PTX div.rn, not XLA's approximate division."""
    x = jax.ShapeDtypeStruct((1, 14336), jnp.float32)
    for quantize, name in ((qx.q8_blocks, "quantize_x_q8"), (qx.q8_k_blocks, "quantize_x_q8_k")):
        text = jax.jit(quantize).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count(name) >= 1 and "div.rn.f32" in text


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="codes='int4'.*int8, words, f32"):
        qx.q8_blocks(jnp.ones((1, 32)), "int4")
    with pytest.raises(ValueError, match=r"\(2, 33\)"):
        qx.q8_blocks(jnp.ones((2, 33)))
    with pytest.raises(ValueError, match="per=3 .* 4 groups"):
        qx.q8_blocks(jnp.ones((1, 128)), per=3)
    with pytest.raises(ValueError, match="zeros=-1"):
        qx.q8_blocks(jnp.ones((1, 128)), zeros=-1)
    with pytest.raises(ValueError, match=r"\(1, 288\) .* multiple of 256"):
        qx.q8_k_blocks(jnp.ones((1, 288)))
    with pytest.raises(ValueError, match="codes='int4'"):
        qx.q8_k_blocks(jnp.ones((1, 256)), "int4")
    assert [qx.groups_per_program(c) for c in (32, 96, 256, 2048, 14336)] == [1, 1, 8, 16, 16]
