"""numlab.analysis.attribution: the generic mix machinery on closed-form functions, then planted causes
in a real (small synthetic) Qwen3-MoE: one low group must get the attribution, closure, ablation
against integrated gradients, forced routing and planted swaps."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numlab.analysis import attribution as A
from numlab.analysis import metrics
from numlab.models.config import Qwen3MoeConfig
from numlab.models.sites import site_names
from numlab.models.synthetic import make_model

# Small enough to compile quickly, with the real layout (Q4_K_M mix, two layer variants).
CFG = Qwen3MoeConfig(n_layers=2, d_model=256, n_heads=4, n_kv_heads=1, head_dim=64, n_experts=8,
                     n_experts_used=2, d_expert=256, vocab=256)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab, (4, 16))
RNG = np.random.default_rng(3)


@functools.lru_cache(maxsize=None)
def _model():
    return make_model(CFG, seed=1)


@functools.lru_cache(maxsize=None)
def _analysis(low, by):
    return A.analyze(_model(), TOKENS, low, "f32", by=by, ig_points=8)


def _share(res, name, key="omc"):
    ig = np.asarray(res["ig"][key], np.float64)
    tot = ig.reshape(ig.shape[0], -1).sum(axis=1)
    return tot[res["groups"].names.index(name)] / tot.sum()


# ---------------------------------------------------------------- groups and quadrature

def test_group_sites_partition():
    names = site_names(CFG)
    for by, n in (("kind", 21), ("layer", 4), ("site", len(names))):
        g = A.group_sites(names, by)
        chex.assert_shape(g.matrix, (n, len(names)))
        np.testing.assert_array_equal(g.matrix.sum(axis=0), 1)
    g = A.group_sites(names, "kind")
    assert g.members(g.names.index("ffn_down_exps")) == ("blk.0.ffn_down_exps", "blk.1.ffn_down_exps")
    assert A.group_sites(names, "layer").names == ("blk.0", "blk.1", "output_norm", "output")
    with pytest.raises(ValueError, match="valid: kind, layer, site"):
        A.group_sites(names, "op")


@pytest.mark.parametrize("rule,n,degree", [("gauss", 4, 7), ("midpoint", 1, 1)])
def test_quadrature_exact_degree(rule, n, degree):
    t, w = A.quadrature(n, rule)
    for d in range(degree + 1):
        assert abs(np.dot(w, t ** d) - 1 / (d + 1)) < 1e-14
    assert abs(np.dot(w, t ** (degree + 1)) - 1 / (degree + 2)) > 1e-6
    with pytest.raises(ValueError, match="valid: gauss, midpoint"):
        A.quadrature(4, "simpson")
    with pytest.raises(ValueError, match="n >= 1"):
        A.quadrature(0)


# ---------------------------------------------------------------- closed-form stand-ins for f(m)

W = jnp.asarray(RNG.standard_normal((6, 5)))
E = jnp.asarray(RNG.standard_normal((6, 5)) * 0.1)
G3 = jnp.asarray([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], jnp.float64)


def _linear(m):
    return jnp.sum(W, axis=0) + m @ E              # f(m) = a + sum_i m_i e_i


def _quadratic(m):
    d = m @ E
    return 0.5 * jnp.sum(d * d) + jnp.sum(d)


def test_linear_f_ablation_ig_first_order_agree():
    f0, f1 = _linear(jnp.zeros(6)), _linear(jnp.ones(6))
    abl = A.ablation(_linear, G3) - f0
    loo = f1 - A.leave_one_out(_linear, G3)
    ig = A.integrated_gradients(_linear, G3, 3)
    fo = A.first_order(_linear, jnp.full(6, 0.3), G3)
    want = G3 @ E
    for got in (abl, loo, ig, fo):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    clo = A.closure(ig, f0, f1)
    np.testing.assert_allclose(clo["gap"], 0, atol=1e-14)


def test_quadratic_f_ig_closes_gradient_at_zero_does_not():
    ig = A.integrated_gradients(_quadratic, G3, 2)
    change = _quadratic(jnp.ones(6)) - _quadratic(jnp.zeros(6))
    assert abs(float(jnp.sum(ig)) - float(change)) < 1e-13 * abs(float(change))
    # per group: IG_g = <d_g, d>/2 + sum(d_g) for d = sum_g d_g (the quadratic form: cross terms split evenly)
    d = G3 @ E
    np.testing.assert_allclose(ig, 0.5 * d @ d.sum(0) + d.sum(1), rtol=1e-12)
    g0 = A.first_order(lambda m: 0.5 * jnp.sum((m @ E) ** 2), jnp.zeros(6), G3)
    np.testing.assert_array_equal(g0, 0)
    chex.assert_trees_all_close(A.first_order(_quadratic, jnp.ones(6), G3),
                                G3 @ jax.grad(_quadratic)(jnp.ones(6)), rtol=1e-13)


def test_sweep_batches_match_vmap_and_shares():
    rows = jnp.asarray(RNG.random((7, 6)))
    np.testing.assert_allclose(A.sweep(_linear, rows, batch_size=3), jax.vmap(_linear)(rows), rtol=1e-15)
    np.testing.assert_allclose(A.shares([1.0, 3.0]), [0.25, 0.75])
    assert np.all(np.isnan(A.shares([0.0, 0.0])))


def test_linear_cosine_drop_is_the_second_order_split():
    a0 = jnp.asarray(RNG.standard_normal((3, 64)))
    deltas = jnp.asarray(RNG.standard_normal((4, 3, 64))) * 1e-4
    c = A.linear_cosine_drop(a0, deltas)
    chex.assert_shape(c, (4, 3))
    exact = metrics.one_minus_cos(a0 + deltas.sum(0), a0)
    np.testing.assert_allclose(c.sum(0), exact, rtol=1e-3)
    # along a0 nothing counts; a group alone gets its own |P d_g|^2 / (2|a0|^2)
    np.testing.assert_allclose(A.linear_cosine_drop(a0, a0[None] * 1e-3), 0, atol=1e-20)
    one = A.linear_cosine_drop(a0, deltas[:1])[0]
    np.testing.assert_allclose(one, metrics.one_minus_cos(a0 + deltas[0], a0), rtol=1e-3)


# ---------------------------------------------------------------- the real model: planted causes

@pytest.mark.parametrize("low,by,group,key", [
    ("f32; blk.0.ffn_down_exps.act=q8_k", "site", "blk.0.ffn_down_exps", "matvec act f32→q8_k"),
    ("f32; *.attn_q.act=bf16", "kind", "attn_q", "matvec act f32→bf16"),
    ("f32; *.router_softmax.dtype=bf16", "kind", "router_softmax", "softmax dtype f32→bf16"),
])
def test_planted_cause_recovered(low, by, group, key):
    res = _analysis(low, by)
    g = res["groups"].names.index(group)
    assert res["causes"][group] == key
    assert sum(c != "same precision" for c in res["causes"].values()) == 1
    assert _share(res, group) >= 0.95, _share(res, group)
    assert _share(res, group, "kld") >= 0.95
    lin = res["linear"]["omc"].sum(axis=1)
    assert lin[g] / lin.sum() >= 0.95
    # only the planted group low is the low run itself; all but it is the reference
    assert np.max(res["low_summary"]["omc"]) > 1e-9
    np.testing.assert_allclose(res["ablation"]["omc"][g], res["low_summary"]["omc"], rtol=1e-6)
    assert np.max(res["leave_one_out"]["omc"][g]) < 1e-3 * np.max(res["low_summary"]["omc"])


def test_closure_where_routing_does_not_change_and_ablation_matches_ig():
    # Two parallel sites of layer 0 (both read the reference's normed stream): their local errors do
    # not depend on each other, so the path m = t·1 is smooth and small errors are in the linear regime.
    res = _analysis("f32; blk.0.attn_q.act=bf16; blk.0.attn_k.act=bf16", "kind")
    assert np.all(res["low_summary"]["swaps"] == 0)
    free, forced = res["low_summary"]["omc"], res["forced"]["omc"]
    assert np.min(free) > 1e-8
    np.testing.assert_allclose(forced, free, rtol=1e-3)
    for ig, change in ((res["ig"]["omc"], free), (res["ig"]["kld"], res["low_summary"]["kld"])):
        clo = A.closure(ig, 0.0, change)
        assert np.all(clo["rel_gap"] < 0.01), clo
    # the router margin moves linearly in small errors: one-group ablations (real runs with free
    # routing) and integrated gradients agree group by group and layer by layer
    names = res["groups"].names
    ig = res["ig"]["margin"].mean(axis=(1, 3))                       # [groups, layers]
    abl = res["ablation"]["margin"] - res["ref_summary"]["margin"]
    scale = np.max(np.abs(abl))
    assert scale > 1e-5
    np.testing.assert_allclose(ig, abl, atol=0.05 * scale)
    for name in ("attn_q", "attn_k"):
        assert np.min(np.abs(abl[names.index(name)])) > 0.2 * scale
    # 1 - cos is quadratic: linear propagation at m = 0 splits it as integrated gradients do, the
    # gradient at m = 0 is zero, the one at m = 1 is not
    np.testing.assert_allclose(res["linear"]["omc"], res["ig"]["omc"], atol=0.05 * np.max(free))
    assert np.max(np.abs(res["zero_grad"]["omc"])) < 1e-3 * np.max(np.abs(res["first_order"]["omc"]))


PLANT_SWAP = "f32; blk.1.*.act=q8_k; blk.1.ffn_gate_inp.act=f32"


def test_planted_swap_free_forced_and_attributed():
    res = _analysis(PLANT_SWAP, "layer")
    swaps = res["low_summary"]["swaps"]
    assert swaps[0] == 0 and swaps[1] > 0, swaps      # layer 0 runs the reference ops: no swap there
    # routing accounting: the swaps add to layer 1's divergence, nothing at layer 0
    free, forced = res["low_summary"]["omc"], res["forced"]["omc"]
    assert free[0] == pytest.approx(forced[0], rel=1e-6, abs=1e-12)
    assert free[1] > forced[1]
    # every flipped choice's margin move is attributed to the planted layer
    r0, r1 = res["ref"], res["low"]
    flipped = np.asarray(metrics.swaps(r0["topk_idx"], r1["topk_idx"])) > 0
    moves = np.asarray(res["ig"]["margin"])[:, flipped]             # [groups, flips]
    names = res["groups"].names
    assert np.all(moves[names.index("blk.1")] / moves.sum(axis=0) >= 0.95)
    assert _share(res, "blk.1") >= 0.95 and _share(res, "blk.1", "kld") >= 0.95
    # the forced replay keeps the reference's choices by construction, along the whole path
    assert res["forced"]["swaps"] == 0
    # routing accounting in the report's terms: the swaps cause part of layer 1's divergence
    assert 0 < (free[1] - forced[1]) / free[1] < 1
