"""first_nonfinite finds the site where a planted NaN/Inf first appears: a NaN norm weight, an Inf
block scale in a chosen (and in an unused) expert, a NaN embedding row, and an f16 overflow that only
the f16 policy hits."""
import jax.numpy as jnp
import numpy as np
import pytest

from numlab.analysis.nonfinite import NonFinite, first_nonfinite, nonfinite_report
from numlab.formats import QTensor
from numlab.models.config import Qwen3MoeConfig
from numlab.models.qwen3_moe import Model, forward
from numlab.models.synthetic import make_model

CONFIG = Qwen3MoeConfig(n_layers=3, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                        n_experts_used=2, d_expert=256, vocab=64)
TOKENS = np.array([5, 9, 1, 33, 7, 2], np.int32)
F16_INF, F16_NAN, F16_BIG = b"\x00\x7c", b"\x00\x7e", b"\x00\x70"  # +inf, nan, 8192


@pytest.fixture(scope="module")
def model():
    return make_model(CONFIG, seed=0)


def _with(model, **tensors):
    return Model(tensors={**model.tensors, **{k.replace("__", "."): v for k, v in tensors.items()}},
                 config=model.config)


def _set_q4k_scale(q: QTensor, index, f16: bytes) -> QTensor:
    """q with the super-block scale d (bytes 0-1 of every 144-byte Q4_K block) of rows[index] set."""
    assert q.fmt == "q4_k"
    data = np.array(q.data)
    rows = data[index]
    blocks = rows.reshape(rows.shape[:-1] + (-1, 144))
    blocks[..., 0:2] = np.frombuffer(f16, np.uint8)
    data[index] = blocks.reshape(rows.shape)
    return QTensor(jnp.asarray(data), q.fmt, q.shape)


def test_clean_model_is_finite(model):
    assert first_nonfinite(model, TOKENS, "f32") is None


def test_nan_norm_weight_reported_at_its_site(model):
    bad = _with(model, blk__1__ffn_norm=model.tensors["blk.1.ffn_norm"].at[5].set(jnp.nan))
    assert first_nonfinite(bad, TOKENS, "f32") == NonFinite("blk.1.ffn_norm", 1, 0)
    worse = _with(bad, blk__0__attn_v=_set_q4k_scale(model.tensors["blk.0.attn_v"], 17, F16_NAN))
    assert first_nonfinite(worse, TOKENS, "f32") == ("blk.0.attn_v", 0, 0)


def test_nan_embedding_row_names_its_token(model):
    emb = _with(model, token_embd=_set_q4k_scale(model.tensors["token_embd"], int(TOKENS[3]), F16_NAN))
    assert first_nonfinite(emb, TOKENS, "f32") == ("token_embd", None, 3)
    prompts = np.stack([TOKENS[::-1], TOKENS])  # the bad token at position 2 in prompt 0, 3 in prompt 1
    assert nonfinite_report(emb, prompts, {"low": "f32"}) == {
        "low": {"site": "token_embd", "layer": None, "token": 2, "prompt": 0}}


def test_inf_expert_counts_only_where_chosen(model):
    idx = np.asarray(forward(model, TOKENS, "f32", capture="attn_q").topk_idx[1])  # [T, k] in layer 1
    unused = sorted(set(range(CONFIG.n_experts)) - set(idx.ravel().tolist()))
    assert unused, idx
    down = model.tensors["blk.1.ffn_down_exps"]
    hidden = _with(model, blk__1__ffn_down_exps=_set_q4k_scale(down, (unused[0], 3), F16_INF))
    assert first_nonfinite(hidden, TOKENS, "f32") is None
    expert = int(idx[4, 1])
    first_use = int(np.argmax((idx == expert).any(axis=1)))
    used = _with(model, blk__1__ffn_down_exps=_set_q4k_scale(down, (expert, 3), F16_INF))
    assert first_nonfinite(used, TOKENS, "f32") == ("blk.1.ffn_down_exps", 1, first_use)


def test_f16_overflow_only_under_f16_policy(model):
    big = _with(model, blk__1__attn_q=_set_q4k_scale(model.tensors["blk.1.attn_q"], slice(None), F16_BIG))
    q = np.asarray(forward(big, TOKENS, "f32", capture="attn_q").sites["attn_q"][1])
    assert np.isfinite(q).all() and np.abs(q).max() > 65504  # fine in f32, past f16's largest value
    report = nonfinite_report(big, TOKENS, {"low": "blk.1.attn_q_norm.dtype=f16", "ref": "f32"})
    assert report == {"low": {"site": "blk.1.attn_q_norm", "layer": 1, "token": 0, "prompt": 0}, "ref": None}
