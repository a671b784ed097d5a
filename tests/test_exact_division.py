"""div_exact / div_rn: float32 division rounded as IEEE (numpy's), on arbitrary bit patterns."""
import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from numlab.formats._common import div_exact, div_rn

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38,
                      1.0, -1.0, 3.0, 127.0], np.float32)


def _pairs():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, (2, 200_000), dtype=np.uint64).astype(np.uint32)
    a, b = bits.view(np.float32)
    sa, sb = np.meshgrid(_SPECIALS, _SPECIALS)
    amax = np.abs(rng.standard_normal(50_000) * rng.uniform(1e-3, 1e3, 50_000)).astype(np.float32)
    return (np.concatenate([a, sa.ravel(), amax, np.ones_like(amax)]),
            np.concatenate([b, sb.ravel(), np.full_like(amax, 127), amax / np.float32(127)]))


class ExactDivisionTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_div_exact_matches_ieee_bits(self):
        a, b = _pairs()
        with np.errstate(all="ignore"):
            want = a / b
        got = np.asarray(self.variant(div_exact)(jnp.asarray(a), jnp.asarray(b)))
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        self.assertEqual(int((~same).sum()), 0, msg=f"first differing pair: {a[~same][:3]} / {b[~same][:3]}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_div_rn_on_this_backend(self):
        rng = np.random.default_rng(3)
        a = (rng.standard_normal(100_000) * 50).astype(np.float32)
        b = rng.uniform(0.5, 300, 100_000).astype(np.float32)
        got = np.asarray(self.variant(div_rn)(a, b))
        np.testing.assert_array_equal(got.view(np.uint32), (a / b).view(np.uint32))
