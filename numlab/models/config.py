"""Qwen3-MoE hyperparameters: named sizes, and their GGUF metadata (`qwen3moe.*` keys)."""
import dataclasses

import numpy as np

ARCH = "qwen3moe"
# config field -> (GGUF key, kind); vocab is the row count of token_embd, not a key.
METADATA = {
    "n_layers": (f"{ARCH}.block_count", int),
    "context_length": (f"{ARCH}.context_length", int),
    "d_model": (f"{ARCH}.embedding_length", int),
    "d_expert": (f"{ARCH}.expert_feed_forward_length", int),
    "n_heads": (f"{ARCH}.attention.head_count", int),
    "n_kv_heads": (f"{ARCH}.attention.head_count_kv", int),
    "head_dim": (f"{ARCH}.attention.key_length", int),
    "n_experts": (f"{ARCH}.expert_count", int),
    "n_experts_used": (f"{ARCH}.expert_used_count", int),
    "rope_theta": (f"{ARCH}.rope.freq_base", float),
    "rms_eps": (f"{ARCH}.attention.layer_norm_rms_epsilon", float),
}
VALUE_LENGTH_KEY = f"{ARCH}.attention.value_length"


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    """Shape of a Qwen3-MoE decoder. Float fields are held as their float32 values (as GGUF stores them)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    d_expert: int
    vocab: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    context_length: int = 40960

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type is float or f.type == "float":
                object.__setattr__(self, f.name, float(np.float32(v)))
            elif isinstance(v, bool) or int(v) != v or int(v) <= 0:
                raise ValueError(f"config {f.name} must be a positive integer, got {v!r}")
            else:
                object.__setattr__(self, f.name, int(v))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if not 1 <= self.n_experts_used < self.n_experts:
            raise ValueError(f"n_experts_used {self.n_experts_used} must be in 1..{self.n_experts - 1} "
                             f"(n_experts {self.n_experts})")
        if not (self.rope_theta > 0 and self.rms_eps > 0):
            raise ValueError(f"rope_theta {self.rope_theta} and rms_eps {self.rms_eps} must be positive")

    @property
    def d_attn(self) -> int:
        """Width of the concatenated query heads (n_heads · head_dim)."""
        return self.n_heads * self.head_dim


def to_gguf_metadata(config: Qwen3MoeConfig) -> dict:
    """{GGUF key: value} for the `qwen3moe.*` keys (value_length = key_length)."""
    out = {key: getattr(config, field) for field, (key, _) in METADATA.items()}
    out[VALUE_LENGTH_KEY] = config.head_dim
    return out


def from_gguf_metadata(values: dict, vocab: int) -> Qwen3MoeConfig:
    """Config from {GGUF key: value} (the METADATA keys) and the vocabulary size."""
    return Qwen3MoeConfig(vocab=vocab, **{field: values[key] for field, (key, _) in METADATA.items()})


CONFIGS = {
    "tiny": Qwen3MoeConfig(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=16,
                           n_experts_used=4, d_expert=256, vocab=512, context_length=4096),
    "small": Qwen3MoeConfig(n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, head_dim=64, n_experts=32,
                            n_experts_used=8, d_expert=256, vocab=4096, context_length=4096),
    "qwen3-30b-a3b": Qwen3MoeConfig(n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                                    n_experts=128, n_experts_used=8, d_expert=768, vocab=151936),
}


def get(size) -> Qwen3MoeConfig:
    """A config as is, or CONFIGS[size]."""
    if isinstance(size, Qwen3MoeConfig):
        return size
    if size not in CONFIGS:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(CONFIGS)}")
    return CONFIGS[size]


def tensor_shapes(config: Qwen3MoeConfig) -> dict:
    """{GGUF tensor name (without ".weight"): numpy shape} of every tensor, in file order. Matrices are
    [rows, cols] (y = W x), expert stacks [n_experts, rows, cols], norm weights [d]."""
    c = config
    out = {"token_embd": (c.vocab, c.d_model), "output_norm": (c.d_model,), "output": (c.vocab, c.d_model)}
    for i in range(c.n_layers):
        out.update({f"blk.{i}.{name}": shape for name, shape in layer_tensor_shapes(c).items()})
    return out


def layer_tensor_shapes(config: Qwen3MoeConfig) -> dict:
    """{tensor name without the blk.{i}. prefix: numpy shape} of one layer's tensors."""
    c = config
    return {
        "attn_norm": (c.d_model,),
        "attn_q": (c.d_attn, c.d_model),
        "attn_k": (c.n_kv_heads * c.head_dim, c.d_model),
        "attn_v": (c.n_kv_heads * c.head_dim, c.d_model),
        "attn_q_norm": (c.head_dim,),
        "attn_k_norm": (c.head_dim,),
        "attn_output": (c.d_model, c.d_attn),
        "ffn_norm": (c.d_model,),
        "ffn_gate_inp": (c.n_experts, c.d_model),
        "ffn_gate_exps": (c.n_experts, c.d_expert, c.d_model),
        "ffn_up_exps": (c.n_experts, c.d_expert, c.d_model),
        "ffn_down_exps": (c.n_experts, c.d_model, c.d_expert),
    }


LAYER_TENSORS = tuple(layer_tensor_shapes(CONFIGS["tiny"]))
