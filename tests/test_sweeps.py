"""Sweeps: every config of configs/sweeps/ runs at tiny size and writes its JSON and plot (one smoke
test each, asserting the structure and one number), plus the chunked runner, resuming, path parsing
and Monte Carlo arithmetic's significant bits against their closed forms."""
import importlib.util
import json
import math
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from numlab.analysis import mca, sweeps
from numlab.io import ChunkStore

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sweeps"
KEYS = ("name", "experiment", "size", "hypothesis", "reported", "their_verdict", "measured", "verdict",
        "figures", "wall_s", "backend", "config", "data", "plots")


def config(name, **overrides):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny")
    cfg.update(overrides)
    return cfg


def run(name, folder, **overrides) -> dict:
    """Run a config into folder; check the files and the JSON's structure; the parsed JSON."""
    cfg = config(name, **overrides)
    sweeps.run_to_folder(cfg, folder)
    js, png = folder / f"{name}.json", folder / f"{name}.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    result = json.loads(js.read_text())
    assert set(KEYS) <= set(result)
    assert result["name"] == name and result["size"] == "tiny" and result["wall_s"] > 0
    assert isinstance(result["measured"], str) and result["measured"]
    assert not (folder / ".chunks").exists()  # chunks are removed once the result is written
    return result


def test_every_config_has_a_test():
    tested = {n[len("test_config_"):] for n in globals() if n.startswith("test_config_")}
    assert tested == {p.stem for p in CONFIGS.glob("*.py")}


# --- op level -----------------------------------------------------------------------------------

def test_config_h5_q6k_reduction_order(tmp_path):
    r = run("h5_q6k_reduction_order", tmp_path)
    cand = r["figures"]["q6_k candidate f32.order=sequential|f32.order=pairwise rel_l2"]
    base = r["figures"]["q6_k baseline q8_k|f32 rel_l2"]
    assert np.max(cand) < 1e-5 < 1e-3 < np.min(base)  # order ~1e-7 (CASCADE: ≈1e-7); Q8_K ~1e-2
    assert r["verdict"] == "falsified"
    vs_ref = r["data"]["by_format"]["q6_k"]["max"]["vs_ref"]
    for path in ("f32", "f32.order=pairwise", "f32.order=sequential"):
        assert 0 < np.max(vs_ref[path]["rel_l2"]) < 1e-6  # every float32 order lands within f32 of f64
    assert np.max(vs_ref["f32.acc=f64"]["rel_l2"]) == 0  # f32 inputs, f64 products and sums: exact


def test_config_h6_activation_distributions(tmp_path):
    r = run("h6_activation_distributions", tmp_path)
    assert r["data"]["families"] == ["uniform", "lognormal", "outlier5", "outlier100"]
    cand = np.asarray(r["figures"]["q6_k candidate f32.order=sequential|f32.order=pairwise rel_l2"])
    assert cand.shape == (4, 1) and cand.max() < 1e-5
    norms = np.asarray(r["figures"]["q6_k ref output L2"]).ravel()
    assert norms[3] > 3 * norms[0]  # 100× outliers make the output larger (CASCADE: 584 vs 22.4)


def test_config_h7_chain_length(tmp_path):
    r = run("h7_chain_length", tmp_path)
    assert r["data"]["steps"] == list(range(1, 49))
    lo, hi = r["figures"]["q6_k candidate rel_l2 N=1..48"]
    assert 0 < lo <= hi < 1e-4
    assert r["figures"]["q6_k baseline 1-cos growth N=1->48"] > 1


def test_config_h8_real_q6k(tmp_path):
    r = run("h8_real_q6k", tmp_path)
    assert r["figures"]["tensor"] == "blk.2.ffn_down_exps"  # tiny: layers 0, 1 are Q4_K (use_more_bits)
    assert r["figures"]["formats"] == {"q4_k": ["blk.0.ffn_down_exps", "blk.1.ffn_down_exps"],
                                       "q6_k": ["blk.2.ffn_down_exps", "blk.3.ffn_down_exps"]}
    assert r["verdict"] == "falsified"


def test_config_h9_silu_exp(tmp_path):
    r = run("h9_silu_exp", tmp_path)
    pairs = r["data"]["pairs"]
    assert len(pairs["f32/exp2|f32/exp"]["max_rel"]) == 5
    assert max(pairs["f32/exp|f64/exp"]["max_rel"]) < 1e-6
    assert 1e-8 < max(pairs["f32/exp2|f32/exp"]["max_rel"]) < 1e-5  # CASCADE: ≤ 1e-6 (jitted: not folded)
    assert max(pairs["bf16/exp|f64/exp"]["max_rel"]) > 1e-3


def test_config_h10_q4k_real_slice(tmp_path):
    r = run("h10_q4k_real_slice", tmp_path)
    q = r["data"]["by_format"]["q4_k"]
    assert (q["rows"], q["cols"]) == (16, 256)  # tiny attn_k has 256 columns
    assert r["verdict"].startswith("q8_k is the outlier")


def test_config_h11_three_path(tmp_path):
    r = run("h11_three_path", tmp_path)
    f = r["figures"]
    assert f["q4_k f32|f64 max_rel"] < 1e-6 < 1e-3 < f["q4_k q8_k|f32 max_rel"]
    assert f["q4_k q8_k|f32 one_minus_cos"] < 1e-3
    assert r["verdict"].startswith("q8_k is the outlier")


def test_config_formats_acts(tmp_path):
    r = run("formats_acts", tmp_path)
    by = r["data"]["by_format"]
    assert set(by) == {"q4_k", "q6_k", "q8_0"}
    assert "q8_k" not in by["q8_0"]["mean"]["vs_ref"] and "q8_0" not in by["q4_k"]["mean"]["vs_ref"]
    for fmt in by:
        assert np.max(by[fmt]["mean"]["vs_ref"]["f32"]["rel_l2"]) < 1e-6


def test_config_input_scale(tmp_path):
    r = run("input_scale", tmp_path)
    vs = r["data"]["by_format"]["q4_k"]["mean"]["vs_ref"]
    q81 = np.asarray(vs["q8_1"]["rel_l2"]).ravel()
    assert q81[0] == pytest.approx(1.0)  # scale 1e-6: Q8_1's fp16 block scale underflows to 0
    assert np.max(vs["q8_k"]["rel_l2"]) < 0.05  # Q8_K keeps an f32 scale


def test_config_mca_chain(tmp_path):
    r = run("mca_chain", tmp_path)
    by = r["data"]["by_bits"]
    for bits in ("24", "8"):
        # one perturbed op: σ/|μ| = 2^-t/√3, so s = t + log2(√3)
        assert by[bits]["median"][0] == pytest.approx(int(bits) + math.log2(math.sqrt(3)), abs=0.4)
        assert by[bits]["median"][-1] < by[bits]["median"][0]


# --- model level --------------------------------------------------------------------------------

def test_config_h0_nan(tmp_path):
    r = run("h0_nan", tmp_path)
    assert set(r["figures"]) == {"cpu", "gpu", "f16"}
    assert r["figures"]["cpu"]["nonfinite_logits"] == 0 and r["figures"]["gpu"]["first_nonfinite"] is None
    assert r["verdict"].startswith("no NaN")


def test_config_h1_q6k_accumulation(tmp_path):
    r = run("h1_q6k_accumulation", tmp_path)
    base, var = r["figures"]["gpu|cpu"], r["figures"]["gpu_acc64|cpu"]
    assert 0 <= var["layers_cos_ge_threshold"] <= 4 and 0.9 < base["worst_cos"] < 1
    assert abs(r["figures"]["reduction_share"]) < 0.01 and r["verdict"] == "falsified"


def test_config_h2_last_layer_routing(tmp_path):
    r = run("h2_last_layer_routing", tmp_path)
    f = r["figures"]
    assert f["layer"] == 3 and f["k"] == 4 and 0 <= f["swaps_max"] <= 4
    assert 0.9 < f["router_cos_mean"] < 1


def test_config_h3_softmax_moe_sum(tmp_path):
    r = run("h3_softmax_moe_sum", tmp_path)
    assert abs(r["figures"]["reduction_share"]) < 0.01 and r["verdict"] == "falsified"


def test_config_h4_next_token(tmp_path):
    r = run("h4_next_token", tmp_path)
    f = r["figures"]
    assert f["prompts"] == 4 and len(f["cpu_tokens"]) == 4 and 0 <= f["agree"] <= 4
    assert r["verdict"] == ("benign" if f["agree"] == 4 else "not benign")


def test_config_next_token_agreement(tmp_path):
    r = run("next_token_agreement", tmp_path)
    assert r["figures"]["prompts"] == 8 and 0.5 < r["figures"]["all_positions_top1_agree"] <= 1


def test_config_layer_cosine(tmp_path):
    r = run("layer_cosine", tmp_path)
    f = r["figures"]
    assert len(f["min_cos_per_layer"]) == 4 and 0 < f["per_matvec_one_minus_cos"] < f["worst_one_minus_cos"]
    assert -1 <= f["routing_share"] <= 1
    assert set(r["data"]["pairs"]) == {"gpu|cpu", "cpu|ref", "gpu|ref", "cuda|ref", "cpu@gpu|gpu"}


def test_config_expert_sets(tmp_path):
    r = run("expert_sets", tmp_path)
    f = r["figures"]
    # the f32 path stays at the f64 reference's expert sets; Q8_K activations move some
    assert f["gpu|ref"]["swap_share_mean"] < f["cpu|ref"]["swap_share_mean"]
    assert len(r["data"]["pairs"]["cpu|ref"]["swap_share"]) == 4


def test_config_mca(tmp_path):
    r = run("mca", tmp_path)
    for bits in (24, 8):
        f = r["figures"][f"t={bits}"]
        assert f["bits_last_layer"] < bits + 1 and 0 <= f["p_topk_change_max"] <= 1
    assert r["figures"]["t=8"]["bits_min"] < r["figures"]["t=24"]["bits_min"]


# --- machinery ----------------------------------------------------------------------------------

def test_map_chunked_pads_and_cuts():
    x = jnp.arange(5.0)
    out = sweeps.vmap_chunked(lambda v: {"a": {"sq": v * v}, "b": v + 1}, (x,), chunk=2)
    chex.assert_trees_all_close(out, {"a": {"sq": np.arange(5.0) ** 2}, "b": np.arange(5.0) + 1})


def test_chunks_resume(tmp_path):
    """A finished chunk in the store is loaded instead of recomputed."""
    store = ChunkStore(tmp_path)
    store.save(0, {"y": np.array([-7.0, -7.0])})
    out = sweeps.vmap_chunked(lambda v: {"y": v}, (jnp.arange(4.0),), chunk=2, store=store)
    np.testing.assert_array_equal(out["y"], [-7.0, -7.0, 2.0, 3.0])
    assert store.done(2) and np.array_equal(store.load(2)["y"], [2.0, 3.0])


def test_run_to_folder_refuses_to_overwrite(tmp_path):
    cfg = config("h9_silu_exp")
    sweeps.run_to_folder(cfg, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        sweeps.run_to_folder(cfg, tmp_path)
    sweeps.run_to_folder(cfg, tmp_path, overwrite=True)


def test_parse_path_and_errors():
    assert sweeps.parse_path("f32.order=sequential") == sweeps.Path("f32", "f32", "sequential")
    assert sweeps.parse_path("q8_k.acc=f64") == sweeps.Path("q8_k", "f64", None)
    for bad, match in (("q9", "unknown act"), ("f32.order=random", "bad field"), ("q8_k.order=xla", "float acts")):
        with pytest.raises(ValueError, match=match):
            sweeps.parse_path(bad)
    with pytest.raises(ValueError, match="valid: normal"):
        sweeps.family_index("cauchy")
    with pytest.raises(ValueError, match="unknown experiment"):
        sweeps.run(config("h9_silu_exp", experiment="nope"))


def test_significant_bits_closed_form():
    assert mca.significant_bits(8.0, 1.0) == 3.0
    assert mca.significant_bits(1.0, 0.0, max_bits=53) == 53.0 and mca.significant_bits(0.0, 1.0) == 0.0
    rng = np.random.default_rng(0)
    exact = np.full((1, 3), 2.0)
    diffs = exact * 2.0 ** -10 * rng.uniform(-1, 1, (4000, 1, 3))
    bits = mca.layer_bits(diffs, exact)
    assert bits["median"][0] == pytest.approx(10 + math.log2(math.sqrt(3)), abs=0.05)
    assert bits["normwise"][0] == pytest.approx(10 + math.log2(math.sqrt(3)), abs=0.05)


def test_topk_change_probability():
    exact = np.array([[[0, 1], [2, 3]]])                     # L=1, T=2, k=2
    samples = np.array([[[[1, 0], [2, 3]]], [[[0, 1], [2, 4]]]])  # order does not count; one swap
    np.testing.assert_allclose(mca.topk_change_probability(samples, exact), [0.25])
