"""numlab.analysis.metrics against independent float64 formulas (math.fsum, explicit loops) and invariants."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from numlab import ops
from numlab.analysis import metrics

RNG = np.random.default_rng(7)


def _cos_fsum(a, b):
    dot = math.fsum(float(x) * float(y) for x, y in zip(a, b))
    na = math.sqrt(math.fsum(float(x) ** 2 for x in a))
    nb = math.sqrt(math.fsum(float(y) ** 2 for y in b))
    return dot / (na * nb)


def _kld_loop(lr, ll):
    def logp(z):
        m = max(z)
        s = math.log(math.fsum(math.exp(v - m) for v in z))
        return [v - m - s for v in z]
    pr, pl = logp(lr), logp(ll)
    return math.fsum(math.exp(a) * (a - b) for a, b in zip(pr, pl))


class StreamMetricsTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_cosine_rel_l2_max_vs_fsum(self):
        a = RNG.standard_normal((3, 4, 64))
        b = a + 1e-3 * RNG.standard_normal(a.shape)
        cos = self.variant(metrics.cosine)(a, b)
        omc = self.variant(metrics.one_minus_cos)(a, b)
        rel = self.variant(metrics.rel_l2)(b, a)
        mad = self.variant(metrics.max_abs_diff)(a, b)
        chex.assert_shape([cos, omc, rel, mad], (3, 4))
        for i in range(3):
            for t in range(4):
                c = _cos_fsum(a[i, t], b[i, t])
                assert abs(float(cos[i, t]) - c) < 1e-14
                # 1 - cos near 1e-7: the stable form keeps ~12 digits where 1 - c keeps ~9.
                assert abs(float(omc[i, t]) - (1 - c)) < 1e-15 + 1e-6 * (1 - c)
                r = math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(b[i, t], a[i, t]))) / \
                    math.sqrt(math.fsum(x * x for x in a[i, t]))
                assert abs(float(rel[i, t]) - r) < 1e-13 * r
                assert float(mad[i, t]) == float(np.max(np.abs(a[i, t] - b[i, t])))

    def test_one_minus_cos_stable_in_float32(self):
        # Tiny angles in float32: 1 - cos computed as 1 - dot/(|a||b|) is pure rounding noise; the
        # half-squared-distance form keeps the relative error at float32 level.
        a = RNG.standard_normal((16, 256)).astype(np.float32)
        b = (a + 3e-4 * RNG.standard_normal(a.shape)).astype(np.float32)
        with jax.enable_x64(False):
            omc = np.asarray(metrics.one_minus_cos(a, b))
            naive = 1 - np.asarray(metrics.cosine(a, b))
            assert omc.dtype == np.float32
        ref = np.array([1 - _cos_fsum(x, y) for x, y in zip(a.astype(np.float64), b.astype(np.float64))])
        err = np.max(np.abs(omc - ref) / ref)
        assert err < 1e-3, err
        assert np.max(np.abs(naive - ref) / ref) > 10 * err

    def test_invariants_and_zero_vectors(self):
        a = RNG.standard_normal((5, 32))
        np.testing.assert_allclose(metrics.cosine(a, 3.5 * a), 1, atol=1e-15)
        np.testing.assert_allclose(metrics.cosine(a, -a), -1, atol=1e-15)
        np.testing.assert_allclose(metrics.one_minus_cos(a, 2 * a), 0, atol=1e-30)
        np.testing.assert_allclose(metrics.one_minus_cos(a, -a), 2, atol=1e-14)
        z = np.zeros((2, 32))
        np.testing.assert_array_equal(metrics.cosine(z, a[:2]), 0)
        np.testing.assert_array_equal(metrics.one_minus_cos(a[:2], z), 1)
        np.testing.assert_array_equal(metrics.rel_l2(z, z), 0)
        assert np.isinf(metrics.rel_l2(a[:1], z[:1])[0])

    def test_one_minus_cos_gradient_finite_and_zero_at_equal(self):
        a = jnp.asarray(RNG.standard_normal(16))
        g = jax.grad(lambda x: metrics.one_minus_cos(x, a))(a)
        np.testing.assert_allclose(g, 0, atol=1e-15)
        g = jax.grad(lambda x: metrics.one_minus_cos(x, a))(a + 0.1)
        assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0


class TopkMetricsTest(parameterized.TestCase):

    def test_swaps_and_jaccard_by_hand(self):
        ref = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4]])
        low = np.array([[3, 2, 1, 0], [0, 1, 2, 9], [0, 1, 2, 3], [1, 2, 8, 9]])
        np.testing.assert_array_equal(metrics.swaps(ref, low), [0, 1, 4, 2])
        np.testing.assert_allclose(metrics.jaccard(ref, low), [1, 3 / 5, 0, 2 / 6], rtol=1e-15)

    @given(st.integers(0, 2**31 - 1))
    def test_swaps_vs_python_sets(self, seed):
        rng = np.random.default_rng(seed)
        ref = np.stack([rng.permutation(16)[:4] for _ in range(20)])
        low = np.stack([rng.permutation(16)[:4] for _ in range(20)])
        s = np.asarray(metrics.swaps(ref, low))
        j = np.asarray(metrics.jaccard(ref, low))
        for r, lw, si, ji in zip(ref, low, s, j):
            a, b = set(r.tolist()), set(lw.tolist())
            assert si == len(a - b)
            assert abs(ji - len(a & b) / len(a | b)) < 1e-15
        np.testing.assert_array_equal(s, metrics.swaps(low, ref))

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="shapes differ"):
            metrics.swaps(np.zeros((2, 4), int), np.zeros((2, 3), int))
        with pytest.raises(TypeError, match="integer"):
            metrics.set_margin(np.zeros((2, 8)), np.zeros((2, 3)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_set_margin(self):
        logits = RNG.standard_normal((6, 10, 16))
        _, idx = jax.lax.top_k(jnp.asarray(logits), 4)
        m = self.variant(metrics.set_margin)(logits, idx)
        np.testing.assert_allclose(m, ops.router_margin(jnp.asarray(logits), 4), rtol=1e-15)
        assert np.all(np.asarray(m) > 0)
        other = np.asarray(idx).copy()
        other[..., 0] = np.asarray(jax.lax.top_k(jnp.asarray(logits), 5)[1])[..., 4]
        mo = np.asarray(self.variant(metrics.set_margin)(logits, other))
        srt = np.sort(logits, axis=-1)[..., ::-1]
        np.testing.assert_allclose(mo, srt[..., 4] - srt[..., 0], rtol=1e-14)
        assert np.all(mo < 0)


class LogitMetricsTest(parameterized.TestCase):

    def test_kld_vs_loop_and_invariants(self):
        lr = RNG.standard_normal((12, 50)) * 3
        ll = lr + 0.3 * RNG.standard_normal(lr.shape)
        k = np.asarray(metrics.kld(lr, ll))
        for i in range(12):
            assert abs(k[i] - _kld_loop(lr[i].tolist(), ll[i].tolist())) < 1e-13
        assert np.all(k > 0)
        np.testing.assert_allclose(metrics.kld(lr, lr), 0, atol=1e-15)
        np.testing.assert_allclose(metrics.kld(lr + 7.0, ll - 2.0), k, rtol=1e-11)

    def test_target_prob_diff_and_argmax(self):
        lr = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
        ll = np.log(np.array([[0.2, 0.6, 0.2], [0.1, 0.2, 0.7]]))
        np.testing.assert_allclose(metrics.target_prob_diff(lr, ll, [1, 2]), [0.3, -0.1], atol=1e-15)
        np.testing.assert_array_equal(metrics.argmax_agree(lr, ll), [False, True])

    def test_mean_and_uncertainty_llama_rule(self):
        v = RNG.standard_normal(101)
        mean, unc = metrics.mean_and_uncertainty(v)
        n = len(v)
        m = math.fsum(v) / n
        var = math.fsum(x * x for x in v) / n - m * m
        assert abs(mean - m) < 1e-15 and abs(unc - math.sqrt(var / (n - 1))) < 1e-15
        assert metrics.mean_and_uncertainty(v[:10])[1] == 0.0
        assert metrics.mean_and_uncertainty(np.ones(50)) == (1.0, 0.0)

    def test_percentiles_by_hand(self):
        v = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
        p = metrics.percentiles(v, (0.0, 0.5, 0.9, 1.0, 0.125))
        assert p == {0.0: 1.0, 0.5: 3.0, 0.9: 4.6, 1.0: 5.0, 0.125: 1.5}
        assert metrics.percentiles([1.0, 2.0, 3.0, 4.0], (0.5,))[0.5] == 2.5
        w = RNG.standard_normal(333)
        got = metrics.percentiles(w, metrics.KLD_PERCENTILES)
        np.testing.assert_allclose(list(got.values()), np.percentile(w, [100 * f for f in got]), rtol=1e-13)
        with pytest.raises(ValueError, match="outside"):
            metrics.percentiles(v, (1.5,))

    def test_kld_stats(self):
        n, vocab = 240, 40
        lr = RNG.standard_normal((n, vocab)) * 2
        ll = lr + 0.2 * RNG.standard_normal(lr.shape)
        tgt = RNG.integers(0, vocab, n)
        s = metrics.kld_stats(lr.reshape(4, 60, vocab), ll.reshape(4, 60, vocab), tgt.reshape(4, 60))
        ks = [_kld_loop(a.tolist(), b.tolist()) for a, b in zip(lr, ll)]
        assert s["n_tokens"] == n
        assert abs(s["kld_mean"] - math.fsum(ks) / n) < 1e-14
        assert abs(s["kld_max"] - max(ks)) < 1e-14 and abs(s["kld_min"] - min(ks)) < 1e-14
        assert abs(s["kld_percentiles"]["50"] - float(np.median(ks))) < 1e-14
        assert list(s["kld_percentiles"]) == ["99.9", "99", "95", "90", "50", "10", "5", "1", "0.1"]
        pr = np.exp(lr) / np.exp(lr).sum(-1, keepdims=True)
        pl = np.exp(ll) / np.exp(ll).sum(-1, keepdims=True)
        dp = pl[np.arange(n), tgt] - pr[np.arange(n), tgt]
        assert abs(s["dp_rms"] - math.sqrt(math.fsum(dp * dp) / n)) < 1e-15
        assert abs(s["dp_mean"] - math.fsum(dp) / n) < 1e-15
        top = float(np.mean(lr.argmax(-1) == ll.argmax(-1)))
        assert 0 < top < 1 and s["same_top"] == top
        assert abs(s["same_top_unc"] - math.sqrt(top * (1 - top) / (n - 1))) < 1e-15
        assert s["kld_unc"] > 0 and s["dp_rms_unc"] > 0
        same = metrics.kld_stats(lr, lr, tgt)
        assert same["kld_mean"] < 1e-15 and same["same_top"] == 1.0 and same["dp_rms"] == 0.0
