"""Policies: the rule grammar (parse / str round trip, hypothesis), errors that list what is valid,
resolution against a model's sites (later rules win, per-layer overrides, weight formats), presets,
JSON, hashing as a static jit argument."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from numlab import policy as P
from numlab.models import config, synthetic
from numlab.models.sites import site_kinds

TINY = config.CONFIGS["tiny"]
SITES = site_kinds(TINY)
FORMATS = {n: synthetic.q4_k_m_format(n, TINY) for n, k in SITES.items() if k == "matvec"}

_globs = st.sampled_from(["*", "blk.*.silu", "blk.4[0-7].router_softmax", "output", "blk.1?.ffn_*_exps",
                          "*_norm", "blk.[!0].moe_sum"])
_rules = st.sampled_from(sorted(P.VALUES)).flatmap(
    lambda f: st.builds(P.Rule, _globs, st.just(f), st.sampled_from(P.VALUES[f])))


@given(st.lists(_rules, max_size=6))
def test_text_and_json_round_trip(rules):
    policy = P.Policy(tuple(rules))
    assert P.parse(str(policy)) == policy
    assert P.Policy.from_json(policy.to_json()) == policy
    assert hash(P.parse(str(policy))) == hash(policy)


def test_parse_tolerates_spaces_newlines_and_empty_entries():
    p = P.parse(" *.act = q8_k ;\n\n blk.4[0-7].router_softmax.dtype=f64 ;")
    assert p.rules == (P.Rule("*", "act", "q8_k"), P.Rule("blk.4[0-7].router_softmax", "dtype", "f64"))
    assert str(p) == "*.act=q8_k; blk.4[0-7].router_softmax.dtype=f64"
    assert P.parse("") == P.Policy()


@pytest.mark.parametrize("text, message", [
    ("blk.0.attn_q act=f32", r"bad policy rule 'blk.0.attn_q act=f32': expected GLOB.field=value with field one "
                             r"of act, acc, dtype, order, exp"),
    ("=f32", "bad policy rule '=f32'"),
    ("blk.0.attn_q.act", "bad policy rule 'blk.0.attn_q.act'"),
    ("*.precision=f32", r"unknown field 'precision' in rule \*.precision=f32; valid fields: act, acc, dtype, "
                        r"order, exp"),
    ("*.act=q4_k", r"unknown value 'q4_k' for field 'act' in rule \*.act=q4_k; valid: f64, f32, bf16, f16, q8_k, "
                   r"q8_1, q8_0$"),
    ("*.order=random", "unknown value 'random' for field 'order'.*valid: xla, pairwise, sequential$"),
    ("*.exp=exp10", "valid: exp, exp2$"),
])
def test_bad_rules_are_rejected_with_what_is_valid(text, message):
    with pytest.raises(ValueError, match=message):
        P.parse(text)


def test_unknown_field_in_a_rule_object_lists_fields():
    with pytest.raises(ValueError, match="unknown field 'precision'.*valid fields: act, acc, dtype, order, exp"):
        P.Rule("*", "precision", "f32")


def test_defaults_later_rules_win_and_per_layer_overrides():
    r = P.parse("*.dtype=bf16; blk.[12].*.dtype=f64; blk.2.silu.dtype=f16; *.act=q8_k; "
                "*.ffn_gate_inp.act=f32").resolve(SITES, FORMATS)
    assert r["blk.0.silu"] == {"dtype": "bf16", "exp": "exp"}
    assert r["blk.1.silu"] == {"dtype": "f64", "exp": "exp"}
    assert r["blk.2.silu"] == {"dtype": "f16", "exp": "exp"}
    assert r["blk.2.attn_norm"] == {"dtype": "f64", "order": "xla"}
    assert r["blk.3.ffn_down_exps"] == {"act": "q8_k", "acc": "f32"}
    assert r["blk.3.ffn_gate_inp"] == {"act": "f32", "acc": "f32"}
    assert r["output"] == {"act": "q8_k", "acc": "f32"}
    assert set(r) == set(SITES)
    assert P.Policy().resolve(SITES)["blk.0.attn"] == {"dtype": "f32", "order": "xla"}


def test_resolve_errors_name_the_rule_and_list_the_valid_sites_or_fields():
    with pytest.raises(ValueError, match=r"glob 'blk.9.\*' matches no site; valid sites: blk.\{0..3\}.\{attn_norm, "
                                         r"attn_q, .*, ffn_add\}, output_norm, output$"):
        P.parse("blk.9.*.dtype=f64").resolve(SITES)
    with pytest.raises(ValueError, match=r"rule blk.0.attn_norm.act=f32: field 'act' applies to none of the 1 sites "
                                         r"it matches \(their fields by kind: norm: dtype, order\)"):
        P.parse("blk.0.attn_norm.act=f32").resolve(SITES)
    with pytest.raises(ValueError, match="site 'blk.0.ffn_gate_inp' has f32 weights, which act='q8_1' does not "
                                         "apply to; valid acts for f32: f64, f32, bf16, f16$"):
        P.parse("*.act=q8_1").resolve(SITES, FORMATS)
    with pytest.raises(ValueError, match="site 'blk.0.attn_q' has q4_k weights, which act='q8_0' does not apply "
                                         "to; valid acts for q4_k: f64, f32, bf16, f16, q8_k, q8_1$"):
        P.parse("blk.0.attn_q.act=q8_0").resolve(SITES, FORMATS)
    with pytest.raises(ValueError, match="unknown kind 'conv'; valid kinds: matvec, norm"):
        P.Policy().resolve({"blk.0.x": "conv"})


def test_presets_resolve_on_a_q4_k_m_model():
    assert set(P.PRESETS) >= {"ref-f64", "f32", "bf16", "ggml-cpu", "ggml-cuda"}
    res = {name: p.resolve(SITES, FORMATS) for name, p in P.PRESETS.items()}
    assert all(v == "f64" for fields in res["ref-f64"].values() for v in fields.values() if v not in ("xla", "exp"))
    for preset, act in (("ggml-cpu", "q8_k"), ("ggml-cuda", "q8_1")):
        for name, fmt in FORMATS.items():
            assert res[preset][name]["act"] == (act if fmt in ("q4_k", "q6_k") else "f32"), (preset, name)
        assert all(f.get("dtype", "f32") == "f32" for f in res[preset].values())
    assert res["bf16"]["blk.0.attn_q"] == {"act": "bf16", "acc": "f32"}
    assert res["bf16"]["blk.0.moe_sum"]["dtype"] == "bf16"


def test_format_rules_select_matvecs_by_weight_format():
    r = P.parse("*.acc=f32; @q6_k.acc=f64").resolve(SITES, FORMATS)
    q6 = {n for n, f in FORMATS.items() if f == "q6_k"}
    assert q6 and q6 != set(FORMATS)
    assert {n for n in FORMATS if r[n]["acc"] == "f64"} == q6
    assert P.parse("@q8_0.act=q8_0").resolve(SITES, FORMATS) == P.Policy().resolve(SITES, FORMATS)  # no q8_0 here
    assert P.parse("@q6_k.acc=f64").resolve(SITES) == P.Policy().resolve(SITES)  # formats unknown: no site
    with pytest.raises(ValueError, match="unknown weight format 'q9_k' in rule @q9_k.act=f32; valid after '@': "
                                         "q4_k, q5_k, q6_k, q8_k, q8_0, q8_1, f32, f16, bf16$"):
        P.parse("@q9_k.act=f32")
    with pytest.raises(ValueError, match=r"an @format rule sets matvec fields \(act, acc\), not 'dtype'"):
        P.parse("@q6_k.dtype=f64")


def test_engine_presets_follow_the_weight_format():
    # ggml's CPU: vec_dot_type Q8_K for k-quants, Q8_0 for Q8_0, the weight's own type for float weights;
    # llama.cpp's CUDA: Q8_1 for every quantized type, float32 activations for float weights.
    fmts = dict(FORMATS, **{"blk.0.attn_q": "q8_0", "blk.1.attn_k": "f16", "blk.2.attn_v": "bf16",
                            "blk.3.ffn_down_exps": "q5_k"})
    want = {"ggml-cpu": {"q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k", "q8_0": "q8_0", "f16": "f16",
                         "bf16": "bf16", "f32": "f32"},
            "ggml-cuda": {"q4_k": "q8_1", "q5_k": "q8_1", "q6_k": "q8_1", "q8_0": "q8_1", "f16": "f32",
                          "bf16": "f32", "f32": "f32"}}
    for preset, acts in want.items():
        res = P.PRESETS[preset].resolve(SITES, fmts)
        for name, fmt in fmts.items():
            expect = "f32" if name.endswith("ffn_gate_inp") else acts[fmt]
            assert res[name]["act"] == expect, (preset, name, fmt)


def test_get_accepts_policies_presets_rule_text_and_combinations():
    assert P.get("ggml-cpu") == P.PRESETS["ggml-cpu"]
    p = P.get("ggml-cpu; blk.3.router_softmax.dtype=f64")
    assert p.rules == P.PRESETS["ggml-cpu"].rules + (P.Rule("blk.3.router_softmax", "dtype", "f64"),)
    assert P.get(p) is p
    with pytest.raises(ValueError, match="unknown policy preset 'ggml-gpu'; presets: ref-f64, f32, bf16, ggml-cpu, "
                                         "ggml-cuda"):
        P.get("ggml-gpu")
    with pytest.raises(TypeError, match="got int"):
        P.get(3)
    with pytest.raises(ValueError, match="policy JSON must be an object with a 'rules' list"):
        P.Policy.from_json("[1, 2]")


def test_policies_are_static_jit_arguments():
    calls = []

    @jax.jit(static_argnames="policy")
    def f(x, policy):
        calls.append(str(policy))
        return x * len(policy.rules)
    assert f(jnp.ones(2), policy=P.parse("*.act=f64")).tolist() == [1, 1]
    assert f(jnp.ones(2), policy=P.parse("*.act = f64")).tolist() == [1, 1]   # equal policy: cached
    assert f(jnp.ones(2), policy=P.PRESETS["ref-f64"]).tolist() == [3, 3]
    assert calls == ["*.act=f64", "*.act=f64; *.acc=f64; *.dtype=f64"]
