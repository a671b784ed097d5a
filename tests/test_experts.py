"""ops.expert_qmatvec in both reference layouts against per-pair qmatvec on each pair's own expert, its
derivative against the transposed dequantized product, the kernel route (Pallas' CPU interpreter under
NUMLAB_KERNELS=always) against the reference alone and inside the whole model, and the grouping."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from numlab import kernels, ops
from numlab.formats import QTensor
from numlab.models import synthetic
from numlab.models.qwen3_moe import forward
from numlab.ops import experts

E, ROWS, COLS, K = 5, 32, 256, 2


def _case(fmt, tokens, shared, seed):
    """Weights [E, ROWS, COLS] in fmt, K distinct experts per token, x [tokens, COLS] (shared) or
    [tokens, K, COLS]."""
    rng = np.random.default_rng(seed)
    w = QTensor.from_float(rng.standard_normal((E, ROWS, COLS)).astype(np.float32), fmt)
    x = jnp.asarray(rng.standard_normal((tokens,) + (() if shared else (K,)) + (COLS,)) * 2, jnp.float32)
    expert = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]), jnp.int32)
    return w, x, expert


def _per_pair(w, x, expert, act, acc="f32"):
    """Each pair through ops.qmatvec's reference on its own gathered expert (vmapped over pairs)."""
    t, k = expert.shape
    pairs = jnp.broadcast_to(x[:, None] if x.ndim == 2 else x, (t, k, COLS)).reshape(t * k, COLS)
    one = lambda d, v: ops.qmatvec(QTensor(d, w.fmt, w.shape), v, act, acc, impl="reference")  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(w.data[expert.reshape(-1)], pairs)).reshape(t, k, -1)


class ReferenceTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("q4_k", "q8_k", 6, False, "dense"), ("q4_k", "q8_1", 3, True, "grouped"),
                              ("q5_k", "f64", 4, False, "grouped"))
    def test_each_pair_is_qmatvec_on_its_expert(self, fmt, act, tokens, shared, layout):
        w, x, expert = _case(fmt, tokens, shared, sum(map(ord, fmt + act)))
        acc = "f64" if act == "f64" else "f32"
        y = self.variant(lambda w, x, e: experts.reference(w, x, e, act, acc, layout))(w, x, expert)
        want = _per_pair(w, x, expert, act, acc)
        chex.assert_shape(y, (tokens, K, ROWS))
        scale = np.abs(want).max()
        chex.assert_trees_all_close(np.asarray(y), want, rtol=0, atol=(1e-12 if act == "f64" else 2e-6) * scale)

    def test_derivative_is_the_transposed_dequantized_product(self, layout="grouped"):
        """The grouped layout's tangent map (the dense one's is in every CPU attribution test)."""
        w, x, expert = _case("q4_k", 6, False, 3)
        ct = jnp.asarray(np.random.default_rng(4).standard_normal((6, K, ROWS)), jnp.float32)
        loss = lambda x: jnp.sum(experts.reference(w, x, expert, "q8_k", "f32", layout) * ct)  # noqa: E731
        grad = jax.jit(jax.grad(loss))(x)
        deq = np.asarray(w.dequantize(), np.float64)[np.asarray(expert)]             # [T, K, rows, cols]
        want = np.einsum("tkrc,tkr->tkc", deq, np.asarray(ct, np.float64))
        np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.fixture
def always(monkeypatch):
    """NUMLAB_KERNELS=always with JAX's trace caches cleared on the way in and out."""
    jax.clear_caches()
    monkeypatch.setenv("NUMLAB_KERNELS", "always")
    yield
    monkeypatch.delenv("NUMLAB_KERNELS")
    jax.clear_caches()


def test_kernel_route_grad_and_vmap_agree_with_the_reference(always):
    w, x, expert = _case("q4_k", 3, True, 5)
    assert kernels.use_for(w, "q8_1", "f32", 1) and not kernels.use_for(w, "f64", "f64", 1)
    scale = np.abs(_per_pair(w, x, expert, "q8_1")).max()
    y = jax.jit(lambda x, e: ops.expert_qmatvec(w, x, e, "q8_1"))(x, expert)
    chex.assert_trees_all_close(np.asarray(y), _per_pair(w, x, expert, "q8_1"), rtol=0, atol=1e-5 * scale)
    two = jax.jit(jax.vmap(lambda x, e: ops.expert_qmatvec(w, x, e, "q8_1")))(jnp.stack([x, -x]),
                                                                            jnp.stack([expert, expert[::-1]]))
    chex.assert_trees_all_close(np.asarray(two[1]), _per_pair(w, -x, expert[::-1], "q8_1"), rtol=0,
                                atol=1e-5 * scale)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.expert_qmatvec(w, x, expert, "q8_1"))))(x)
    want = np.einsum("tkrc->tc", np.asarray(w.dequantize(), np.float64)[np.asarray(expert)])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_model_through_the_kernels_matches_the_reference(always):
    """The tiny model's prefill with every quantized product through the kernels (attention, experts,
    lm_head) against the same prefill on the reference path: same experts chosen, logits to rounding."""
    model = synthetic.make_model("tiny", seed=0)
    tokens = jnp.asarray([3, 17, 99], jnp.int32)
    fast = forward(model, tokens, "ggml-cuda")
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NUMLAB_KERNELS", "off")
        ref = forward(model, tokens, "ggml-cuda")
    np.testing.assert_array_equal(fast.topk_idx, ref.topk_idx)
    scale = float(jnp.max(jnp.abs(ref.logits)))
    chex.assert_trees_all_close(fast.logits, ref.logits, rtol=0, atol=1e-4 * scale)
    assert float(jnp.max(jnp.abs(fast.logits - ref.logits))) > 0     # the kernels did run: rounding differs


def test_bad_input_and_mode_are_errors(monkeypatch):
    w, x, expert = _case("q4_k", 4, True, 6)
    with pytest.raises(ValueError, match=r"x of shape \(4, 256\) must be \[3, 256\] or \[3, 2, 256\]"):
        ops.expert_qmatvec(w, x, expert[:3])
    with pytest.raises(ValueError, match=r"expert must be integer \[tokens, k\], got int32 \(8,\)"):
        ops.expert_qmatvec(w, x, expert.reshape(-1))
    with pytest.raises(ValueError, match=r"expert stack \[E, rows, row_bytes\], got q4_k data \(32, 144\)"):
        ops.expert_qmatvec(QTensor(w.data[0], w.fmt, w.shape), x, expert)
    with pytest.raises(ValueError, match="act 'q8_0' does not apply to q4_k experts; valid for q4_k: f64, "):
        ops.expert_qmatvec(w, x, expert, "q8_0")
    with pytest.raises(ValueError, match="unknown impl 'fast'; valid: auto, reference"):
        ops.qmatvec(QTensor(w.data[0], w.fmt, w.shape), x, impl="fast")
    with pytest.raises(ValueError, match="unknown layout 'sparse'; valid: dense, grouped"):
        experts.reference(w, x, expert, layout="sparse")
    monkeypatch.setenv("NUMLAB_KERNELS", "on")
    with pytest.raises(ValueError, match="NUMLAB_KERNELS='on'; valid: auto, off, always"):
        ops.expert_qmatvec(w, x, expert)


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.sampled_from([1, 2, 4, 16]), st.integers(0, 99))
def test_group_by_expert_tiles(pairs, n_exp, tokens, seed):
    """Every pair gets its own slot; a tile holds one expert's pairs only; unused tiles are -1; the
    tiles number at most pairs/tokens plus one partial tile per expert touched; tile_sources inverts
    the slots (to_tiles' rows gathered by it, zeros elsewhere)."""
    expert = np.random.default_rng(seed).integers(0, n_exp, pairs)
    slot, tile_expert = (np.asarray(a) for a in experts.group_by_expert(jnp.asarray(expert), n_exp, tokens))
    assert len(set(slot.tolist())) == pairs
    np.testing.assert_array_equal(tile_expert[slot // tokens], expert)
    used = np.zeros(len(tile_expert), bool)
    used[slot // tokens] = True
    assert np.all(tile_expert[~used] == -1)
    assert used.sum() <= pairs // tokens + len(set(expert.tolist()))
    src = np.asarray(experts.tile_sources(jnp.asarray(slot), len(tile_expert) * tokens))
    rows = np.random.default_rng(seed).standard_normal((pairs, 3)).astype(np.float32)
    tiled = np.asarray(experts.to_tiles(jnp.asarray(rows), jnp.asarray(slot), len(src)))
    np.testing.assert_array_equal(src[slot], np.arange(pairs))
    np.testing.assert_array_equal(tiled, np.where(src[:, None] >= 0, rows[np.maximum(src, 0)], 0))
