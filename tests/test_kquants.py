"""Q4_K, Q5_K, Q6_K codecs: ggml's bytes on every input family (jit and eager), NaN/Inf blocks,
dequantization against ggml and gguf, unpacked fields, round-trip error bounds of llama.cpp's
test-quantize-fns, and the float32 primitives that keep XLA from changing ggml's roundings."""
import chex
import ggml_oracle
import gguf
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from numlab.formats import kquant_search as ks
from numlab.formats import q4_k, q5_k, q6_k

CODECS = {"q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}
GGUF_TYPES = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
              "q6_k": gguf.GGMLQuantizationType.Q6_K}
FAMILIES = ("normal", "student_t", "outliers", "all_positive", "all_negative", "constant",
            "zero_block", "tiny", "large")
ROWS, N = 4, 1024  # rows of each family; every batch below is [36, 1024] so compilations are shared
NB = N // 256


def family(name: str, seed: int = 0) -> np.ndarray:
    """float32 [ROWS, N] test input of one family."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, N))
    if name == "student_t":
        x = rng.standard_t(2, (ROWS, N))
    elif name == "outliers":
        x = np.where(rng.random((ROWS, N)) < 0.005, 100 * x, x)
    elif name == "all_positive":
        x = np.abs(x) + 0.01
    elif name == "all_negative":
        x = -np.abs(x) - 0.01
    elif name == "constant":
        x = np.full((ROWS, N), 0.7) * np.array([[1], [-1], [3], [-3]])
    elif name == "zero_block":
        x[:, 256:512] = 0
    elif name == "tiny":
        x = 1e-6 * x
    elif name == "large":
        x = 1e3 * x
    return x.astype(np.float32)


BATCH = np.concatenate([family(f) for f in FAMILIES])  # [36, N]


def blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1, 256)


def quantize_jit(fmt: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(CODECS[fmt].quantize_blocks)(blocks(x))).reshape(x.shape[0], -1)


def bad_families(got: np.ndarray, want: np.ndarray) -> list:
    rows = np.any(got != want, axis=-1).reshape(len(FAMILIES), ROWS).any(-1)
    return [f for f, bad in zip(FAMILIES, rows) if bad]


def random_blocks(fmt: str, seed: int = 1) -> np.ndarray:
    """uint8 [36, NB * type_size]: random bytes with finite fp16 d (and dmin)."""
    ts = CODECS[fmt].TYPE_SIZE
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (36 * NB, ts), dtype=np.uint8)
    scale = (rng.standard_normal((36 * NB, 2)) * 10.0 ** rng.uniform(-6, 3, (36 * NB, 2))).astype(np.float16)
    at = slice(ts - 2, ts) if fmt == "q6_k" else slice(0, 4)
    raw[:, at] = scale.view(np.uint8)[:, : at.stop - at.start]
    return raw.reshape(36, -1)


class BytesTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CODECS)
    def test_bytes_equal_ggml_on_every_family(self, fmt):
        got = np.asarray(self.variant(CODECS[fmt].quantize_blocks)(blocks(BATCH)))
        chex.assert_shape(got, (36, NB, CODECS[fmt].TYPE_SIZE))
        self.assertEqual(bad_families(got.reshape(36, -1), ggml_oracle.quantize(BATCH, fmt)), [])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CODECS)
    def test_nan_inf_blocks_become_nan_markers(self, fmt):
        """A block with a NaN or an Inf dequantizes to NaN; every other block keeps ggml's bytes."""
        x = BATCH.copy()
        x[0, 3], x[1, 300], x[2, N - 1], x[3, :] = np.nan, np.inf, -np.inf, np.nan
        bad = np.zeros((36, NB), bool)
        bad[0, 0] = bad[1, 1] = bad[2, NB - 1] = True
        bad[3] = True
        codec = CODECS[fmt]
        got = np.asarray(self.variant(codec.quantize_blocks)(blocks(x)))
        want = ggml_oracle.quantize(x, fmt).reshape(36, NB, -1)
        np.testing.assert_array_equal(got[~bad], want[~bad])
        y = np.asarray(codec.dequantize_blocks(got))
        self.assertTrue(np.all(np.isnan(y[bad])))
        self.assertTrue(np.all(np.isfinite(y[~bad])))

    @parameterized.parameters(*CODECS)
    def test_many_scales_equal_ggml(self, fmt):
        """2**20 values, a scale per block from 1e-3 to 1e3: catches roundings that change rarely."""
        rng = np.random.default_rng(7)
        x = (rng.standard_t(5, (1024, 1024)) * 10.0 ** rng.uniform(-3, 3, (1024, 4, 1)).repeat(256, -1)
             .reshape(1024, 1024)).astype(np.float32)
        np.testing.assert_array_equal(quantize_jit(fmt, x), ggml_oracle.quantize(x, fmt))

    @parameterized.parameters(*CODECS)
    def test_vmap_equals_batch(self, fmt):
        codec = CODECS[fmt]
        got = jax.jit(jax.vmap(codec.quantize_blocks))(blocks(BATCH))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(codec.quantize_blocks)(blocks(BATCH))))


@settings(max_examples=4)
@given(fmt=st.sampled_from(sorted(CODECS)), lead=st.lists(st.integers(1, 2), min_size=1, max_size=2),
       nb=st.integers(1, 2), seed=st.integers(0, 2**31), log_scale=st.floats(-5, 5),
       df=st.sampled_from([1.5, 4.0, 100.0]))
def test_random_shapes_and_scales_equal_ggml(fmt, lead, nb, seed, log_scale, df):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (nb, 256)
    x = (rng.standard_t(df, shape) * 10.0 ** log_scale + rng.normal(0, 1) * 10.0 ** log_scale).astype(np.float32)
    got = np.asarray(jax.jit(CODECS[fmt].quantize_blocks)(x))
    chex.assert_shape(got, tuple(lead) + (nb, CODECS[fmt].TYPE_SIZE))
    want = ggml_oracle.quantize(x.reshape(-1, nb * 256), fmt)
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@settings(max_examples=10)
@given(fmt=st.sampled_from(sorted(CODECS)),
       x=hnp.arrays(np.float32, (2, 256), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_arbitrary_finite_floats_equal_ggml(fmt, x):
    """Any finite float32 values, huge ones included; magnitudes below 1e-30 are zeroed (XLA on CPU
    flushes subnormals, ggml does not). Placed in the standard batch to reuse its compilation."""
    batch = BATCH.copy()
    batch[0, :512] = np.where(np.abs(x) < 1e-30, np.float32(0), x).reshape(-1)
    np.testing.assert_array_equal(quantize_jit(fmt, batch)[0], ggml_oracle.quantize(batch[:1], fmt)[0])


class DequantizeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fmt=tuple(CODECS), source=("ggml", "random"))
    def test_equals_ggml_and_gguf(self, fmt, source):
        raw = ggml_oracle.quantize(BATCH, fmt) if source == "ggml" else random_blocks(fmt)
        got = np.asarray(self.variant(CODECS[fmt].dequantize_blocks)(raw.reshape(36, NB, -1)))
        got = got.reshape(36, N)
        np.testing.assert_array_equal(got.view(np.uint32), ggml_oracle.dequantize(raw, fmt, N).view(np.uint32))
        np.testing.assert_array_equal(got.view(np.uint32),
                                      gguf.quants.dequantize(raw, GGUF_TYPES[fmt]).view(np.uint32))

    @parameterized.product(fmt=tuple(CODECS), source=("ggml", "random"))
    def test_unpacked_fields_rebuild_ggml_values(self, fmt, source):
        """(d*scale)*q - dmin*min from the unpacked integers equals ggml's dequantize_row exactly."""
        raw = ggml_oracle.quantize(BATCH, fmt) if source == "ggml" else random_blocks(fmt)
        u = CODECS[fmt].unpack_blocks(jnp.asarray(raw.reshape(36, NB, -1)))
        n_sub = 16 if fmt == "q6_k" else 8
        chex.assert_shape(u.q, (36, NB, 256))
        chex.assert_shape([u.scales, u.d], [(36, NB, n_sub), (36, NB)])
        q, sc, d = np.asarray(u.q), np.asarray(u.scales), np.asarray(u.d)
        lo, hi = {"q4_k": (0, 15), "q5_k": (0, 31), "q6_k": (-32, 31)}[fmt]
        self.assertTrue(lo <= q.min() and q.max() <= hi)
        self.assertTrue(sc.min() >= (-128 if fmt == "q6_k" else 0) and sc.max() <= (127 if fmt == "q6_k" else 63))
        qf = q.astype(np.float32).reshape(36, NB, n_sub, -1)
        y = (d[..., None] * sc.astype(np.float32))[..., None] * qf
        if fmt == "q6_k":
            self.assertIsNone(u.mins)
            self.assertIsNone(u.dmin)
        else:
            m = np.asarray(u.dmin)[..., None] * np.asarray(u.mins).astype(np.float32)
            y = y - m[..., None]
        np.testing.assert_array_equal(y.reshape(36, N), ggml_oracle.dequantize(raw, fmt, N))


def generate_data(offset: float, n: int) -> np.ndarray:
    """llama.cpp test-quantize-fns' synthetic data: 0.1 + 2*cos(i + offset)."""
    return (0.1 + 2 * np.cos(np.arange(n, dtype=np.float32) + np.float32(offset))).astype(np.float32)


def array_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """test-quantize-fns' error measure: sqrt(sum of squared differences, in double) / n."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.sum(diff * diff)) / a.size)


@parameterized.parameters(*CODECS)
class RoundTripTest(parameterized.TestCase):

    def test_error_within_test_quantize_fns_bounds(self, fmt):
        """MAX_QUANTIZATION_TOTAL_ERROR = 0.002 on its 4096 values; MAX_QUANTIZATION_REFERENCE_ERROR
        = 0.0001 between the round trip and ggml's own."""
        batch = BATCH.copy()
        batch[:4] = generate_data(0.0, 4 * N).reshape(4, N)
        codec = CODECS[fmt]
        raw = quantize_jit(fmt, batch)
        y = np.asarray(codec.dequantize_blocks(raw.reshape(36, NB, -1))).reshape(36, N)
        total = array_rmse(batch[:4], y[:4])
        self.assertLess(total, 0.002)
        self.assertGreater(total, 0.0)
        reference = ggml_oracle.dequantize(ggml_oracle.quantize(batch[:4], fmt), fmt, N)
        self.assertLess(array_rmse(y[:4], reference), 0.0001)

    def test_bad_shapes_and_dtypes_raise(self, fmt):
        codec = CODECS[fmt]
        with self.assertRaisesRegex(ValueError, "256"):
            codec.quantize_blocks(np.zeros((2, 128), np.float32))
        with self.assertRaisesRegex(TypeError, "float64"):
            codec.quantize_blocks(np.zeros((2, 256), np.float64))
        with self.assertRaisesRegex(ValueError, str(codec.TYPE_SIZE)):
            codec.dequantize_blocks(np.zeros((2, 100), np.uint8))


class PrimitivesTest(parameterized.TestCase):
    """ggml's float32 operations as kquant_search spells them, under jit, against numpy."""

    def test_product_then_sum_rounds_twice(self):
        rng = np.random.default_rng(3)
        a, b = rng.standard_normal((2, 32, 4096)).astype(np.float32)
        got = jax.jit(lambda a, b: ks.seq_sum(ks.mul(a, b, a == a)))(a, b)
        want = np.zeros(4096, np.float32)
        for i in range(32):
            want = want + a[i] * b[i]  # numpy: a rounded product, then a rounded sum
        np.testing.assert_array_equal(np.asarray(got), want)

    def test_division_by_broadcast_is_correctly_rounded(self):
        rng = np.random.default_rng(4)
        a = rng.standard_normal((4096, 32)).astype(np.float32)
        b = rng.standard_normal((4096, 1)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(jax.jit(ks.div)(a, b)), a / b)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: ks.div(a, np.float32(63)))(a)),
                                      a / np.float32(63))

    def test_nearest_int_is_ggmls(self):
        v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.49999, 4194303.0, -4194303.0, 1e7, -3e38, 0.0],
                     np.float32)
        want = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
        got = np.asarray(jax.jit(ks.nearest_int)(v))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[:6], [0, 2, 2, 0, -2, -2])  # half to even
