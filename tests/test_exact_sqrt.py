"""sqrt_correct / sqrt_rn and f16_value: float32 results bit-equal to numpy's IEEE ones."""
import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from numlab.formats._common import f16_value, sqrt_correct, sqrt_rn

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, 1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38,
                      3.4028235e38, 0.25, 1.0, 2.0, 3.0, 16777215.0, 16777216.0, 16777217.0], np.float32)


def _inputs():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits.view(np.float32), _SPECIALS])


def _ulps_off(y, k):
    """y moved k ulps (towards +inf for k > 0), where y is positive and finite; y elsewhere."""
    out = y.copy()
    for _ in range(abs(k)):
        out = np.nextafter(out, np.float32(np.inf if k > 0 else 0)).astype(np.float32)
    return np.where(np.isfinite(y) & (y > 0), out, y)


class ExactSqrtTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(-3, -1, 0, 2, 3)
    def test_sqrt_correct_from_an_approximation_ulps_off(self, k):
        x = _inputs()
        with np.errstate(invalid="ignore"):
            want = np.sqrt(x)
        got = np.asarray(self.variant(sqrt_correct)(jnp.asarray(x), jnp.asarray(_ulps_off(want, k))))
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        self.assertEqual(int((~same).sum()), 0, msg=f"first differing inputs: {x[~same][:3]} -> {got[~same][:3]}")

    def test_sqrt_correct_needs_the_approximation_within_3_ulp(self):
        x = _inputs()[:20_000]
        with np.errstate(invalid="ignore"):
            want = np.sqrt(x)
        got = np.asarray(sqrt_correct(jnp.asarray(x), jnp.asarray(_ulps_off(want, 4))))
        self.assertGreater(int((got.view(np.uint32) != want.view(np.uint32)).sum()), 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sqrt_rn_on_this_backend(self):
        rng = np.random.default_rng(5)
        x = np.abs(rng.standard_t(3, 100_000) * 50).astype(np.float32)
        got = np.asarray(self.variant(sqrt_rn)(x))
        np.testing.assert_array_equal(got.view(np.uint32), np.sqrt(x).view(np.uint32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_f16_value_of_every_half(self):
        h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        got = np.asarray(self.variant(f16_value)(jnp.asarray(h)))
        want = h.astype(np.float32)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        self.assertTrue(same.all(), msg=f"first differing halves: {h[~same][:3]} -> {got[~same][:3]}")
