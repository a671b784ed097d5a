"""numlab's Qwen3-MoE forward against Hugging Face transformers' Qwen3MoeForCausalLM (PyTorch, CPU)
loaded with the same dequantized weights: the f32 policy against the float32 model, ref-f64 against
the model in float64 (.double(), with transformers' hard-coded float32 steps — RMSNorm, router
softmax, RoPE table, attention softmax — patched to run in the input's dtype)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from numlab.formats import QTensor
from numlab.models import synthetic
from numlab.models.qwen3_moe import forward

TOKENS = np.array([3, 141, 59, 265, 358, 97, 93, 238], np.int32)


def _dequantized(model):
    return {n: np.asarray(t.dequantize() if isinstance(t, QTensor) else t, np.float32)
            for n, t in model.tensors.items()}


def _hf_model(model):
    c = model.config
    hc = Qwen3MoeConfig(vocab_size=c.vocab, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                        rms_norm_eps=c.rms_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                        moe_intermediate_size=c.d_expert, num_experts=c.n_experts,
                        num_experts_per_tok=c.n_experts_used, norm_topk_prob=True, tie_word_embeddings=False,
                        max_position_embeddings=c.context_length, intermediate_size=c.d_expert)
    hc._attn_implementation = "eager"
    hc._experts_implementation = "eager"
    w = _dequantized(model)
    state = {"model.embed_tokens.weight": w["token_embd"], "model.norm.weight": w["output_norm"],
             "lm_head.weight": w["output"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp"}
    for i in range(c.n_layers):
        for hf_name, ours in names.items():
            state[f"model.layers.{i}.{hf_name}.weight"] = w[f"blk.{i}.{ours}"]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
            [w[f"blk.{i}.ffn_gate_exps"], w[f"blk.{i}.ffn_up_exps"]], axis=1)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = w[f"blk.{i}.ffn_down_exps"]
    net = Qwen3MoeForCausalLM(hc).eval()
    missing, unexpected = net.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return net


def _run(net, tokens):
    with torch.no_grad():
        out = net(torch.from_numpy(tokens.astype(np.int64))[None], output_router_logits=True)
    return out.logits[0].numpy(), np.stack([r.numpy() for r in out.router_logits])


def _rmsnorm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _router(self, x):
    x = x.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.weight)
    top, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), idx


def _rotary(self, x, position_ids):
    dim = self.inv_freq.numel() * 2
    inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    emb = position_ids[..., None].double() * inv_freq
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key, value = hf.repeat_kv(key, module.num_key_value_groups), hf.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@pytest.fixture(scope="module")
def tiny():
    return synthetic.make_model("tiny", seed=3)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_f32_matches_transformers(tiny):
    logits, router = _run(_hf_model(tiny), TOKENS)
    trace = forward(tiny, TOKENS, "f32")
    assert trace.logits.dtype == jnp.float32
    hf_topk = np.argsort(-router, -1)[..., :tiny.config.n_experts_used]
    assert np.array_equal(np.sort(trace.topk_idx, -1), np.sort(hf_topk, -1))
    assert _rel(trace.router_logits, router) <= 1e-5
    assert _rel(trace.logits, logits) <= 1e-5


def test_f64_matches_transformers_in_float64(tiny, monkeypatch):
    monkeypatch.setattr(hf.Qwen3MoeRMSNorm, "forward", _rmsnorm)
    monkeypatch.setattr(hf.Qwen3MoeTopKRouter, "forward", _router)
    monkeypatch.setattr(hf.Qwen3MoeRotaryEmbedding, "forward", _rotary)
    monkeypatch.setattr(hf, "eager_attention_forward", _attention)
    logits, router = _run(_hf_model(tiny).double(), TOKENS)
    assert logits.dtype == np.float64
    trace = forward(tiny, TOKENS, "ref-f64")
    assert trace.logits.dtype == jnp.float64
    assert _rel(trace.router_logits, router) <= 1e-12
    rel = _rel(trace.logits, logits)
    assert rel <= 1e-10
    # the float32 run differs from the float64 one by far more than the tolerance, so the check has teeth
    assert _rel(forward(tiny, TOKENS, "f32").logits, logits) > 1e3 * max(rel, 1e-14)
