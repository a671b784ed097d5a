"""The op sites of a Qwen3-MoE forward pass, generated from the config, in forward order.

Per layer i (`blk.{i}.` prefix), then the globals. Matvec sites carry the name of their GGUF weight
tensor. The flat order of `site_kinds` is the index order of the analysis mix vector.
"""
from numlab.models.config import Qwen3MoeConfig

LAYER_SITES = (
    ("attn_norm", "norm"),          # rmsnorm of the residual stream before attention
    ("attn_q", "matvec"),
    ("attn_k", "matvec"),
    ("attn_v", "matvec"),
    ("attn_q_norm", "norm"),        # rmsnorm per query head
    ("attn_k_norm", "norm"),        # rmsnorm per key head
    ("rope", "rope"),               # rotary embedding of q and k heads together [T, Hq + Hkv, Dh]
    ("attn", "attention"),          # causal GQA: scores, softmax, weighted sum of values
    ("attn_output", "matvec"),
    ("attn_add", "add"),            # residual stream + attention output
    ("ffn_norm", "norm"),
    ("ffn_gate_inp", "matvec"),     # router logits [T, E]
    ("router_softmax", "softmax"),  # router probabilities [T, E]; the top-k choice follows
    ("ffn_gate_exps", "matvec"),    # the chosen experts [T, k, d_expert] (top-k order)
    ("ffn_up_exps", "matvec"),
    ("silu", "silu"),               # silu(gate) · up [T, k, d_expert]
    ("ffn_down_exps", "matvec"),    # the chosen experts [T, k, d_model]
    ("moe_sum", "moe_sum"),         # top-k weights renormalised, weighted sum of the chosen experts
    ("ffn_add", "add"),             # residual stream + MoE output
)
GLOBAL_SITES = (("output_norm", "norm"), ("output", "matvec"))
LAYER_KINDS = dict(LAYER_SITES)
GLOBAL_KINDS = dict(GLOBAL_SITES)


def site_kinds(config: Qwen3MoeConfig) -> dict:
    """{site name: kind} for every site, in forward order (the mix vector's order)."""
    out = {f"blk.{i}.{name}": kind for i in range(config.n_layers) for name, kind in LAYER_SITES}
    out.update(GLOBAL_SITES)
    return out


def site_names(config: Qwen3MoeConfig) -> tuple:
    """Every site name in forward order."""
    return tuple(site_kinds(config))


def site_index(config: Qwen3MoeConfig) -> dict:
    """{site name: position in the mix vector}."""
    return {name: i for i, name in enumerate(site_kinds(config))}
