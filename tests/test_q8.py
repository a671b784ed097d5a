"""Q8_0, Q8_1 and Q8_K codecs: ggml's bytes on every input family, jit and eager; dequantization."""
import ctypes
import functools
import glob
import os

import chex
import ggml
import ggml_oracle
import gguf
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

import numlab.formats as formats
from numlab.formats import q8_0

Q8 = ("q8_0", "q8_1", "q8_k")
FAMILIES = ("normal", "student_t", "outliers", "all_positive", "all_negative", "constant",
            "zero_block", "tiny", "large", "halves")
# Independent parse of the block structs in ggml-common.h.
LAYOUT = {
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    "q8_1": np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)]),
    "q8_k": np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]),
}


def family(name: str, rows: int = 8, n: int = 1024, seed: int = 0) -> np.ndarray:
    """float32 [rows, n] test input of one family."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n))
    if name == "student_t":
        x = rng.standard_t(3, (rows, n))
    elif name == "outliers":
        hit = rng.random((rows, n)) < 0.01
        x = np.where(hit, 100 * x, x)
    elif name == "all_positive":
        x = np.abs(x) + 0.01
    elif name == "all_negative":
        x = -np.abs(x) - 0.01
    elif name == "constant":
        x = np.full((rows, n), 0.7)
    elif name == "zero_block":
        x[:, :256] = 0
    elif name == "tiny":
        x = 1e-6 * x
    elif name == "large":
        x = 1e3 * x
    elif name == "halves":
        # Block max -127 gives d = 1 (q8_0/q8_1) and iscale = 1 (q8_k): every x/d is an exact
        # multiple of 1/2, so ties test roundf (away from zero) against nearest_int (to even).
        x = rng.integers(-253, 254, (rows, n)) / 2
        x[:, ::32] = -127
    return x.astype(np.float32)


def ggml_dequantize_q8_k(raw: np.ndarray, n: int) -> np.ndarray:
    """ggml's dequantize_row_q8_K (exported by libggml-base, not listed as Q8_K's to_float)."""
    lib_dir = os.path.join(os.path.dirname(ggml.__file__), "lib")
    lib = ctypes.CDLL(glob.glob(os.path.join(lib_dir, "libggml-base.*"))[0])
    raw = np.ascontiguousarray(raw)
    out = np.zeros(raw.shape[:-1] + (n,), np.float32)
    lib.dequantize_row_q8_K(ctypes.c_void_p(raw.ctypes.data), ctypes.c_void_p(out.ctypes.data),
                            ctypes.c_int64(out.size))
    return out


def parse(raw: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 [..., nbytes] -> structured array of blocks [..., nb]."""
    raw = np.ascontiguousarray(raw)
    return raw.view(LAYOUT[fmt]).reshape(raw.shape[:-1] + (-1,))


class ByteEqualityTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fmt=Q8, name=FAMILIES)
    def test_bytes_equal_ggml(self, fmt, name):
        x = family(name)
        got = self.variant(functools.partial(formats.quantize, fmt=fmt))(x)
        chex.assert_shape(got, (8, ggml_oracle.row_bytes(fmt, 1024)))
        np.testing.assert_array_equal(np.asarray(got), ggml_oracle.quantize(x, fmt))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fmt=Q8, where=(0, 31, 255), value=(np.nan, np.inf, -np.inf))
    def test_nan_inf_as_ggml(self, fmt, where, value):
        x = family("normal", rows=2, n=512)
        x[0, where] = value
        x[1, 256:] = value
        got = np.asarray(self.variant(functools.partial(formats.quantize, fmt=fmt))(x))
        np.testing.assert_array_equal(got, ggml_oracle.quantize(x, fmt))

    @parameterized.parameters(*Q8)
    def test_many_blocks_equal_ggml(self, fmt):
        """2^20 values over many scales: catches float rewrites (A / c -> A * (1/c)) that bite rarely."""
        rng = np.random.default_rng(7)
        x = (rng.standard_normal((4096, 256)) * 10.0 ** rng.uniform(-3, 3, (4096, 1))).astype(np.float32)
        got = np.asarray(jax.jit(formats.quantize, static_argnums=1)(x, fmt))
        np.testing.assert_array_equal(got, ggml_oracle.quantize(x, fmt))

    @chex.variants(with_jit=True, without_jit=True)
    def test_q8_0_scale_is_correctly_rounded(self):
        """d = amax / 127 in float32 and 1/d, exactly as C computes them (not amax * (1/127))."""
        rng = np.random.default_rng(8)
        x = (rng.standard_normal((1 << 15, 32)) * 10.0 ** rng.uniform(-3, 3, (1 << 15, 1))).astype(np.float32)
        d, _ = self.variant(q8_0.scale_and_codes)(x)
        np.testing.assert_array_equal(np.asarray(d), np.abs(x).max(-1) / np.float32(127))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fmt=Q8, first_sign=(1, -1))
    def test_sign_tie_first_max_wins(self, fmt, first_sign):
        """+m and -m both in a block: q8_k's iscale = -127/max takes the sign of the first."""
        x = family("normal", rows=1, n=256)
        x[0, 5], x[0, 9] = 7.0 * first_sign, -7.0 * first_sign
        got = np.asarray(self.variant(functools.partial(formats.quantize, fmt=fmt))(x))
        np.testing.assert_array_equal(got, ggml_oracle.quantize(x, fmt))

    @parameterized.parameters(*Q8)
    def test_inf_block_codes(self, fmt):
        """The documented outcome: an Inf in a block zeroes its codes and makes its scale infinite."""
        x = family("normal", rows=1, n=256)
        x[0, 3] = np.inf
        blocks = parse(np.asarray(formats.quantize(x, fmt)), fmt)[0]
        self.assertTrue(np.all(blocks[0]["qs"] == 0))
        self.assertTrue(np.isinf(blocks[0]["d"]))

    @parameterized.parameters(*Q8)
    def test_vmap_equals_batch(self, fmt):
        x = family("student_t", rows=4, n=512)
        got = jax.vmap(lambda r: formats.quantize(r, fmt))(x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(formats.quantize(x, fmt)))


def _rows(draw_shape, nb, seed, log_scale):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, draw_shape + (nb,)) * 10.0 ** log_scale).astype(np.float32)


@given(fmt=st.sampled_from(Q8), lead=st.lists(st.integers(1, 3), max_size=2),
       nb=st.integers(1, 3), seed=st.integers(0, 2**31), log_scale=st.integers(-30, 30))
def test_random_shapes_equal_ggml(fmt, lead, nb, seed, log_scale):
    bs = formats.spec(fmt).block_size
    x = _rows(tuple(lead), nb * bs, seed, log_scale)
    got = np.asarray(jax.jit(formats.quantize, static_argnums=1)(x, fmt))
    chex.assert_shape(got, tuple(lead) + (nb * formats.spec(fmt).type_size,))
    np.testing.assert_array_equal(got, ggml_oracle.quantize(x.reshape(-1, nb * bs), fmt).reshape(got.shape))


@given(fmt=st.sampled_from(Q8), data=st.data())
def test_arbitrary_floats_equal_ggml(fmt, data):
    """Any finite float32 values; magnitudes below 1e-30 are zeroed (XLA flushes subnormals, ggml not)."""
    bs = formats.spec(fmt).block_size
    x = data.draw(hnp.arrays(np.float32, (2, bs), elements=st.floats(width=32, allow_nan=False,
                                                                     allow_infinity=False)))
    x = np.where(np.abs(x) < 1e-30, np.float32(0), x)
    got = np.asarray(jax.jit(formats.quantize, static_argnums=1)(x, fmt))
    np.testing.assert_array_equal(got, ggml_oracle.quantize(x, fmt))


class DequantizeTest(parameterized.TestCase):

    @parameterized.parameters(*FAMILIES)
    def test_q8_0_equals_ggml_and_gguf(self, name):
        raw = ggml_oracle.quantize(family(name), "q8_0")
        got = np.asarray(formats.dequantize(raw, "q8_0"))
        np.testing.assert_array_equal(got, ggml_oracle.dequantize(raw, "q8_0", 1024))
        np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0))

    @parameterized.parameters(*FAMILIES)
    def test_q8_k_equals_ggml_dequantize_row(self, name):
        raw = ggml_oracle.quantize(family(name), "q8_k")
        np.testing.assert_array_equal(np.asarray(formats.dequantize(raw, "q8_k")), ggml_dequantize_q8_k(raw, 1024))

    @parameterized.product(fmt=Q8, name=FAMILIES)
    def test_equals_struct_parse(self, fmt, name):
        raw = ggml_oracle.quantize(family(name), fmt)
        b = parse(raw, fmt)
        want = (b["d"].astype(np.float32)[..., None] * b["qs"].astype(np.float32)).reshape(8, 1024)
        np.testing.assert_array_equal(np.asarray(formats.dequantize(raw, fmt)), want)

    @parameterized.parameters(*FAMILIES)
    def test_q8_k_bsums_and_max_code(self, name):
        x = family(name)
        b = parse(np.asarray(formats.quantize(x, "q8_k")), "q8_k")
        qs = b["qs"].astype(np.int64)
        np.testing.assert_array_equal(b["bsums"], qs.reshape(8, 4, 16, 16).sum(-1))
        xb = x.reshape(8, 4, 256)
        first = np.argmax(np.abs(xb), axis=-1)
        nonzero = np.take_along_axis(np.abs(xb), first[..., None], -1)[..., 0] > 0
        code = np.take_along_axis(qs, first[..., None], -1)[..., 0]
        np.testing.assert_array_equal(code[nonzero], -127)  # iscale = -127 / max
        np.testing.assert_array_equal(b["d"][~nonzero], 0)

    @parameterized.parameters(*FAMILIES)
    def test_q8_1_s_is_d_times_sum(self, name):
        x = family(name)
        b = parse(np.asarray(formats.quantize(x, "q8_1")), "q8_1")
        qsum = b["qs"].astype(np.int64).sum(-1)
        d32 = np.abs(x.reshape(8, 32, 32)).max(-1) / np.float32(127)
        np.testing.assert_array_equal(b["s"], (qsum.astype(np.float32) * d32).astype(np.float16))
        d16, s = b["d"].astype(np.float64), b["s"].astype(np.float64)
        # fp16 rounding of d and of s: relative 2^-11, or half the subnormal step 2^-25.
        bound = np.abs(qsum) * (2.0 ** -10 * np.abs(d16) + 2.0 ** -25) + 2.0 ** -11 * np.abs(s) + 2.0 ** -25
        self.assertTrue(np.all(np.abs(s - qsum * d16) <= bound))


class RoundTripTest(parameterized.TestCase):

    @parameterized.parameters(*Q8)
    def test_ggml_total_error_bound(self, fmt):
        """test-quantize-fns: data 0.1 + 2 cos(i), sqrt(sum err^2) / n < MAX_QUANTIZATION_TOTAL_ERROR."""
        n = 32 * 128
        x = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float32))).astype(np.float32)
        y = np.asarray(formats.dequantize(formats.quantize(x, fmt), fmt))
        err = np.sqrt(np.sum((x.astype(np.float64) - y) ** 2)) / n
        self.assertLess(err, 0.002)

    @parameterized.product(fmt=Q8, name=FAMILIES)
    def test_error_within_half_step(self, fmt, name):
        """|x - d q| <= d/2, plus 127 |fp16(d) - d| where d is stored in fp16."""
        x = family(name).astype(np.float64)
        bs = formats.spec(fmt).block_size
        y = np.asarray(formats.dequantize(formats.quantize(x.astype(np.float32), fmt), fmt))
        xb = x.reshape(8, -1, bs)
        d = np.abs(xb).max(-1, keepdims=True) / 127
        slack = 0 if fmt == "q8_k" else 127 * np.abs(d.astype(np.float16).astype(np.float64) - d)
        err = np.abs(xb - y.reshape(xb.shape))
        self.assertTrue(np.all(err <= d / 2 * (1 + 1e-5) + slack + 1e-30))
