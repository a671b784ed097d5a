"""Qwen3-MoE forward on the tiny synthetic model (loaded from its GGUF file): every preset, site
capture, the mix mechanism (mix=0 is the reference run, mix=1 the low run, exactly; gradients and
vmap over mix), forced experts, rule locality, and a compiled program that does not grow with depth."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numlab import policy as policy_lib
from numlab.models import gguf_io, synthetic
from numlab.models.qwen3_moe import Model, forward
from numlab.models.sites import GLOBAL_SITES, LAYER_SITES, site_index, site_kinds

TOKENS = np.array([7, 300, 12, 511, 42, 42, 99, 1], np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    synthetic.write("tiny", path, seed=0)
    return gguf_io.load_gguf(path)


@pytest.fixture(scope="module")
def plain(tiny):
    """A plain run per preset; the f32 one captures every site."""
    return {name: forward(tiny, TOKENS, name, capture="*" if name == "f32" else ()) for name in policy_lib.PRESETS}


def test_every_preset_runs(tiny, plain):
    c = tiny.config
    l, t, k = c.n_layers, len(TOKENS), c.n_experts_used
    for name, tr in plain.items():
        chex.assert_shape(tr.logits, (t, c.vocab))
        chex.assert_shape(tr.resid, (l, t, c.d_model))
        chex.assert_shape(tr.router_logits, (l, t, c.n_experts))
        chex.assert_shape([tr.topk_idx, tr.topk_w], (l, t, k))
        chex.assert_shape(tr.margin, (l, t))
        assert np.all(np.isfinite(tr.logits)), name
        np.testing.assert_allclose(np.sum(tr.topk_w, -1), 1, rtol=1e-2 if name == "bf16" else 1e-6)
        assert np.all(tr.margin >= 0)
        assert tr.logits.dtype == (jnp.float64 if name == "ref-f64" else jnp.float32), name
    ref = plain["ref-f64"].logits
    errs = {n: float(jnp.max(jnp.abs(plain[n].logits - ref)) / jnp.max(jnp.abs(ref))) for n in plain}
    assert errs["ref-f64"] == 0
    assert errs["f32"] < 1e-5, errs
    assert all(1e-4 < errs[n] < 0.5 for n in ("bf16", "ggml-cpu", "ggml-cuda")), errs
    assert not np.array_equal(plain["ggml-cpu"].logits, plain["ggml-cuda"].logits)


def test_top_k_is_the_largest_router_logits(plain):
    tr = plain["f32"]
    k = tr.topk_idx.shape[-1]
    chosen = np.take_along_axis(np.asarray(tr.router_logits), np.asarray(tr.topk_idx), -1)
    kth = np.sort(np.asarray(tr.router_logits), -1)[..., -k]
    assert np.all(chosen >= kth[..., None])
    np.testing.assert_allclose(kth - np.sort(np.asarray(tr.router_logits), -1)[..., -k - 1], tr.margin, rtol=1e-6)


def test_act_quantized_on_float_router_is_an_error_naming_the_site(tiny):
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_inp.* f32 weights.*act='q8_k'.*valid acts for f32: "
                                         r"f64, f32, bf16, f16$"):
        forward(tiny, TOKENS, "*.act=q8_k")


def test_capture_and_a_rule_changes_only_the_sites_it_matches(tiny, plain):
    base = plain["f32"]
    ruled = forward(tiny, TOKENS, "f32; blk.1.router_softmax.dtype=bf16", capture="*")
    c, order = tiny.config, list(site_kinds(tiny.config))
    assert set(base.sites) == {s for s, _ in LAYER_SITES} | {s for s, _ in GLOBAL_SITES}
    chex.assert_shape(base.sites["ffn_down_exps"], (c.n_layers, len(TOKENS), c.n_experts_used, c.d_model))
    chex.assert_shape(base.sites["rope"], (c.n_layers, len(TOKENS), c.n_heads + c.n_kv_heads, c.head_dim))
    np.testing.assert_array_equal(base.sites["output"], base.logits)
    np.testing.assert_array_equal(base.sites["ffn_gate_inp"], base.router_logits)
    np.testing.assert_allclose(jnp.sum(base.sites["router_softmax"], -1), 1, rtol=1e-6)
    first = order.index("blk.1.router_softmax")
    for name in order[:first]:                                  # upstream of the rule: bit for bit the same
        layer, site = name.split(".", 2)[1:] if name.startswith("blk.") else (None, name)
        a, b = base.sites[site], ruled.sites[site]
        np.testing.assert_array_equal(a if layer is None else a[int(layer)], b if layer is None else b[int(layer)],
                                      err_msg=name)
    assert ruled.sites["router_softmax"].dtype == jnp.float32   # stacked over layers in the widest dtype
    diff = np.abs(ruled.sites["router_softmax"][1] - base.sites["router_softmax"][1])
    assert 1e-5 < diff.max() < 1e-2
    with pytest.raises(ValueError, match="cannot capture.*blk.0.silu.*valid: attn_norm"):
        forward(tiny, TOKENS, "f32", capture=("blk.0.silu",))


def test_mix_zero_is_the_reference_run_and_mix_one_the_low_run(tiny, plain):
    n = len(site_kinds(tiny.config))
    zero = forward(tiny, TOKENS, "ggml-cpu", ref="ref-f64", mix=jnp.zeros(n))
    one = forward(tiny, TOKENS, "ggml-cpu", ref="ref-f64", mix=jnp.ones(n))
    ref, low = plain["ref-f64"], plain["ggml-cpu"]
    assert zero.logits.dtype == one.logits.dtype == jnp.float64
    chex.assert_trees_all_equal(zero, ref)
    np.testing.assert_array_equal(one.topk_idx, low.topk_idx)
    for field in ("logits", "resid", "router_logits", "margin"):   # f64 carriers of the f32 low values
        np.testing.assert_array_equal(getattr(one, field).astype(jnp.float32), getattr(low, field), err_msg=field)
    assert np.max(np.abs(ref.logits - low.logits)) > 1e-3


def test_gradient_and_vmap_over_mix(tiny, plain):
    """d metric / d mix is zero exactly at the sites the low policy leaves alone, and (experts forced to
    the reference run's, so nothing flips) predicts the one-site ablations that vmap over one-hot mixes
    computes."""
    idx = site_index(tiny.config)
    n = len(idx)
    low = "f32; blk.1.silu.dtype=bf16; blk.2.ffn_down_exps.act=q8_k"
    changed = ("blk.1.silu", "blk.2.ffn_down_exps")
    forced = plain["f32"].topk_idx
    weights = jnp.cos(jnp.arange(tiny.config.vocab))

    def metric(m):
        return jnp.sum(forward(tiny, TOKENS, low, ref="f32", mix=m, force_experts=forced).logits * weights)
    grad = np.asarray(jax.grad(metric)(jnp.zeros(n)))
    assert all(grad[idx[s]] != 0 for s in changed)
    assert np.all(grad[[i for s, i in idx.items() if s not in changed]] == 0)
    mixes = jnp.zeros((3, n)).at[1, idx[changed[0]]].set(1).at[2, idx[changed[1]]].set(1)
    values = jax.vmap(metric)(mixes)
    np.testing.assert_allclose(values[0], jnp.sum(plain["f32"].logits * weights), rtol=1e-6)
    np.testing.assert_allclose(values[1:] - values[0], grad[[idx[s] for s in changed]], rtol=0.05)


def test_forced_experts_replay_the_free_run_and_steer_another(tiny, plain):
    low, ref = plain["ggml-cpu"], plain["f32"]
    replay = forward(tiny, TOKENS, "ggml-cpu", force_experts=low.topk_idx)
    chex.assert_trees_all_equal(replay, low)
    steered = forward(tiny, TOKENS, "ggml-cpu", force_experts=ref.topk_idx)
    np.testing.assert_array_equal(steered.topk_idx, ref.topk_idx)
    assert not np.array_equal(steered.logits, low.logits)
    with pytest.raises(ValueError, match=r"force_experts must be integer \(4, 8, 4\)"):
        forward(tiny, TOKENS, "f32", force_experts=low.topk_idx[:2])


def test_noise_perturbs_the_mixed_site_at_the_given_precision(tiny, plain):
    idx = site_index(tiny.config)
    mix = jnp.zeros(len(idx)).at[idx["blk.1.attn_q"]].set(1)
    run = lambda bits: forward(tiny, TOKENS, "f32", ref="f32", mix=mix, noise=(jax.random.key(0), bits),  # noqa: E731
                               capture=("attn_q", "attn_k"))
    noisy, exact = run(8.0), run(200.0)                         # 2^-200 vanishes in float32: no perturbation
    np.testing.assert_allclose(exact.logits, plain["f32"].logits, rtol=0, atol=1e-6)
    rel = np.abs(noisy.sites["attn_q"][1] / exact.sites["attn_q"][1] - 1)
    assert 2 ** -10 < rel.max() <= 2 ** -8 * (1 + 1e-6)
    np.testing.assert_array_equal(noisy.sites["attn_q"][0], exact.sites["attn_q"][0])
    np.testing.assert_array_equal(noisy.sites["attn_k"][1], exact.sites["attn_k"][1])
    assert not np.array_equal(noisy.logits, exact.logits)
    with pytest.raises(ValueError, match="noise=.*give ref and mix"):
        forward(tiny, TOKENS, "f32", noise=(jax.random.key(0), 8.0))


def test_vmap_over_prompts_matches_single_runs(tiny, plain):
    prompts = np.stack([TOKENS, TOKENS[::-1]])
    per_prompt = jax.vmap(lambda t: forward(tiny, t, "f32").logits)(prompts)
    np.testing.assert_allclose(per_prompt[0], plain["f32"].logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(per_prompt[1], forward(tiny, prompts[1], "f32").logits, rtol=0, atol=1e-5)


def test_bad_arguments_are_rejected(tiny):
    n = len(site_kinds(tiny.config))
    with pytest.raises(ValueError, match="needs both ref"):
        forward(tiny, TOKENS, "f32", mix=jnp.zeros(n))
    with pytest.raises(ValueError, match=rf"mix must have shape \({n},\)"):
        forward(tiny, TOKENS, "f32", ref="f32", mix=jnp.zeros(3))
    with pytest.raises(ValueError, match="token ids must lie in 0..511"):
        forward(tiny, np.array([1, 512]), "f32")
    with pytest.raises(ValueError, match="unknown policy preset 'f31'"):
        forward(tiny, TOKENS, "f31")


def _deeper(model: Model, n_layers: int) -> Model:
    """The tiny model's layers repeated to n_layers (both weight-format variants present)."""
    tensors = {n: t for n, t in model.tensors.items() if not n.startswith("blk.")}
    for i in range(n_layers):
        j = (0, 2, 1, 3)[i % 4]                                 # layers 0, 1 are Q4_K-only, 2, 3 have Q6_K
        for n, t in model.tensors.items():
            if n.startswith(f"blk.{j}."):
                tensors[f"blk.{i}." + n.split(".", 2)[2]] = t
    return Model(tensors=tensors, config=dataclasses.replace(model.config, n_layers=n_layers))


def test_compile_cost_does_not_grow_with_depth(tiny):
    """Layers run in one scanned loop: the lowered and the optimized programs barely grow from 2 to 8 layers."""
    sizes = {}
    for layers in (2, 8):
        model = _deeper(tiny, layers)
        lowered = jax.jit(lambda mdl, t: forward(mdl, t, "f32").logits).lower(model, TOKENS)
        sizes[layers] = (len(lowered.as_text()), len(lowered.compile().as_text()))
    assert sizes[8][0] < 1.3 * sizes[2][0], sizes
    assert sizes[8][1] < 1.3 * sizes[2][1], sizes


def test_site_list_follows_the_config(tiny):
    kinds = site_kinds(tiny.config)
    assert len(kinds) == tiny.config.n_layers * len(LAYER_SITES) + len(GLOBAL_SITES)
    assert list(kinds)[:3] == ["blk.0.attn_norm", "blk.0.attn_q", "blk.0.attn_k"]
    assert list(kinds)[-2:] == ["output_norm", "output"]
    matvecs = [n for n, k in kinds.items() if k == "matvec"]
    assert all(n in tiny.tensors for n in matvecs)


def test_synthetic_statistics_growth_outliers_and_small_margins(plain):
    tr = plain["f32"]
    norms = np.linalg.norm(np.asarray(tr.resid, np.float64), axis=-1).mean(-1)
    assert np.all(np.diff(norms) > 0), norms                   # the residual stream grows over depth
    channel_rms = np.sqrt(np.mean(np.asarray(tr.resid[-1], np.float64) ** 2, axis=0))
    assert np.max(channel_rms) > 5 * np.median(channel_rms)     # a few outlier channels
    margins = np.asarray(tr.margin)
    assert np.median(margins) < 0.5 and np.mean(margins < 0.05) > 0.05, np.percentile(margins, [5, 50])


def test_engine_presets_run_on_q8_0_and_f16_matrices(tiny):
    # A file mixing Q8_0 and F16 matrices into Q4_K_M: ggml-cpu gives those Q8_0 / F16 activations,
    # exactly as the same policy spelled out site by site.
    from numlab.formats import QTensor
    tensors = dict(tiny.tensors)
    for name, fmt in (("blk.0.attn_q", "q8_0"), ("blk.1.attn_output", "f16")):
        tensors[name] = QTensor.from_float(tiny.tensors[name].dequantize(), fmt)
    model = Model(tensors=tensors, config=tiny.config)
    spelled = "*.act=q8_k; blk.0.attn_q.act=q8_0; blk.1.attn_output.act=f16; *.ffn_gate_inp.act=f32"
    for other in (spelled, spelled.replace("blk.0.attn_q.act=q8_0", "blk.0.attn_q.act=f32")):
        assert forward(model, TOKENS, other).logits.shape == (len(TOKENS), tiny.config.vocab)
    a, b, c = (forward(model, TOKENS, p, capture=("attn_q", "attn_output")) for p in
               ("ggml-cpu", spelled, spelled.replace("blk.0.attn_q.act=q8_0", "blk.0.attn_q.act=f32")))
    chex.assert_trees_all_equal(a.logits, b.logits)
    chex.assert_trees_all_equal(a.sites, b.sites)
    assert not np.array_equal(a.sites["attn_q"][0], c.sites["attn_q"][0])     # q8_0 vs f32 activations
