"""Deterministic synthetic Qwen3-MoE models in llama.cpp's Q4_K_M layout, generated and quantized
with JAX on the default device (the GPU for the full size), one tensor at a time.

Statistics (all from `seed`; the same bytes on the same backend):
- weights: Gaussian scale mixtures z·exp(TAIL·u) (heavy tails), std GAIN/sqrt(cols);
- outlier channels: a few residual channels (OUTLIER_FRACTION of d_model) that attn_output and
  ffn_down write OUTLIER_GAIN times more strongly into, so the residual stream and the normed
  activations carry a few large channels (what hurts per-block activation quantization);
- residual growth: the output projections of layer i are scaled by 1 + GROWTH·i/L;
- router: ffn_gate_inp rows with std ROUTER_STD/sqrt(d_model), so logits have std about ROUTER_STD
  and the gap between the k-th and (k+1)-th logit is often below 0.1;
- norm weights around 1 (q/k norms too), embeddings of std EMBED_STD.
Q4_K_M (llama_tensor_get_type): Q6_K for output and for attn_v and ffn_down_exps on layers where
use_more_bits(i, L); Q4_K for the other matrices and token_embd; F32 for norms and the router.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import numlab.formats as formats
from numlab.formats import QTensor
from numlab.models import config as config_lib
from numlab.models.gguf_io import save_gguf
from numlab.models.qwen3_moe import Model

TAIL = 0.5
GAIN = 1.0
OUTLIER_FRACTION = 1 / 128
OUTLIER_GAIN = 8.0
GROWTH = 2.0
ROUTER_STD = 1.5
EMBED_STD = 0.05
NORM_STD = 0.1
CHUNK_BLOCKS = {"cpu": 1024}
DEFAULT_CHUNK_BLOCKS = 32768


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for the layers whose attn_v and ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_format(name: str, config: config_lib.Qwen3MoeConfig) -> str:
    """Storage format of tensor `name` (no ".weight") in the Q4_K_M mix."""
    base = name.rsplit(".", 1)[-1]
    if len(config_lib.tensor_shapes(config)[name]) == 1 or base == "ffn_gate_inp":
        return "f32"
    if name == "output":
        return "q6_k"
    if base in ("attn_v", "ffn_down_exps") and use_more_bits(int(name.split(".")[1]), config.n_layers):
        return "q6_k"
    return "q4_k"


def quantize(w, fmt: str) -> QTensor:
    """QTensor of float32 w [..., rows, cols] in `fmt`, quantized in fixed-size chunks of blocks (one
    compiled quantizer per format and device, whatever the tensor's shape)."""
    w = jnp.asarray(w, jnp.float32)
    if fmt in formats.FLOAT_FORMATS:
        return QTensor.from_float(w, fmt)
    bs = formats.spec(fmt).block_size
    blocks = w.reshape(-1, bs)
    chunk = CHUNK_BLOCKS.get(jax.default_backend(), DEFAULT_CHUNK_BLOCKS)
    n = blocks.shape[0]
    padded = jnp.pad(blocks, ((0, -n % chunk), (0, 0)))
    parts = [_quantize_chunk(padded[s:s + chunk], fmt) for s in range(0, padded.shape[0], chunk)]
    raw = jnp.concatenate(parts)[:n]
    rows, cols = w.shape[-2:]
    return QTensor.from_bytes(raw.reshape(w.shape[:-2] + (rows, formats.row_bytes(fmt, cols))), fmt, (rows, cols))


@functools.partial(jax.jit, static_argnums=1)
def _quantize_chunk(blocks, fmt):
    return formats.quantize(blocks, fmt)


def _heavy(key, shape, std):
    """Gaussian scale mixture with standard deviation `std`: z·exp(TAIL·u)/exp(TAIL²)."""
    kz, ku = jax.random.split(key)
    z = jax.random.normal(kz, shape, jnp.float32)
    u = jax.random.normal(ku, shape, jnp.float32)
    return z * jnp.exp(TAIL * u) * np.float32(std * np.exp(-TAIL ** 2))


def _outliers(config, seed):
    """Residual channels that the output projections write OUTLIER_GAIN times more strongly into."""
    n = max(1, round(config.d_model * OUTLIER_FRACTION))
    return np.random.default_rng(seed).choice(config.d_model, n, replace=False)


def _kind(name: str, shape) -> str:
    base = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        return "norm"
    return {"token_embd": "embd", "ffn_gate_inp": "router"}.get(base, "matrix")


def _row_gain(name, config, outliers):
    """Per-row scale of a matrix: depth growth and outlier channels for the output projections."""
    base = name.rsplit(".", 1)[-1]
    rows = config_lib.tensor_shapes(config)[name][-2]
    gain = np.ones(rows, np.float32)
    if base in ("attn_output", "ffn_down_exps"):
        gain[:] = 1 + GROWTH * int(name.split(".")[1]) / config.n_layers
        gain[outliers] *= OUTLIER_GAIN
    return gain


@functools.partial(jax.jit, static_argnums=(1, 2))
def _generate(key, kind, shape, row_gain):
    """float32 values of a tensor of `kind` (module docstring)."""
    if kind == "norm":
        return 1 + _heavy(key, shape, NORM_STD)
    if kind == "embd":
        return _heavy(key, shape, EMBED_STD)
    if kind == "router":
        return _heavy(key, shape, ROUTER_STD / np.sqrt(shape[-1]))
    return _heavy(key, shape, GAIN / np.sqrt(shape[-1])) * row_gain[:, None]


def make_model(size="tiny", seed: int = 0) -> Model:
    """Synthetic Model of `size` (a CONFIGS name or a Qwen3MoeConfig) on the default device."""
    config = config_lib.get(size)
    for name, shape in config_lib.tensor_shapes(config).items():
        if len(shape) > 1 and q4_k_m_format(name, config) != "f32" and shape[-1] % 256:
            raise ValueError(f"{name} has {shape[-1]} columns; k-quant rows need a multiple of 256")
    outliers = _outliers(config, seed)
    root = jax.random.key(seed)
    tensors = {}
    for i, (name, shape) in enumerate(config_lib.tensor_shapes(config).items()):
        kind = _kind(name, shape)
        gain = _row_gain(name, config, outliers) if kind == "matrix" else None
        w = _generate(jax.random.fold_in(root, i), kind, shape, gain)
        fmt = q4_k_m_format(name, config)
        tensors[name] = w if len(shape) == 1 else quantize(w, fmt)
    return Model(tensors=tensors, config=config)


def write(size, path, seed: int = 0) -> Model:
    """make_model(size, seed), saved as a GGUF file at path; returns the model."""
    model = make_model(size, seed)
    save_gguf(model, path)
    return model
