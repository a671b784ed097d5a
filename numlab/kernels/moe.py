"""A MoE layer's expert products with the tokens grouped by expert: no Python loop over experts.

The P (token, expert) pairs are sorted by expert and laid out in tiles of `tokens` rows, each tile
holding pairs of one expert only (numlab.ops.experts.group_by_expert; the kernel reads each tile
row's activation row in place, so a token's row is prepared once for its k experts), so one kernel
launch per projection multiplies every tile by its expert's quantized weights and a prompt costs
what the distinct experts it touches cost. Results are numlab.ops.expert_qmatvec's (to float
rounding).
"""
import functools

import jax
import jax.custom_batching
import jax.numpy as jnp

from numlab.formats import QTensor
from numlab.kernels import qmatmul as qm
from numlab.kernels import tuning
from numlab.ops.experts import check_experts, dequantized_experts, from_tiles, group_by_expert, tile_sources

_HI = jax.lax.Precision.HIGHEST


def silu_glu(gate, up):
    """silu(gate) · up in float32, as numlab.ops.swiglu(gate, up, "f32", "exp")."""
    return gate / (1 + jnp.exp(-gate)) * up


def tile_config(w: QTensor, act: str, pairs: int, config: qm.Config | None = None) -> qm.Config:
    """The tiling for `pairs` pairs over the experts of w: config, or tuning's for the mean pairs per expert
    (at most `pairs` experts multiplied)."""
    n_experts = w.data.shape[0]
    per_expert = max(1, pairs // n_experts)
    return qm.fit(config or tuning.config_for(w.fmt, act, per_expert, *w.shape, matrices=min(pairs, n_experts)),
                  *w.shape)


def expert_qmatvec_fast(w: QTensor, x, expert, act: str = "f32", *, config: qm.Config | None = None,
                        interpret: bool = False):
    """numlab.ops.expert_qmatvec(w, x, expert, act, "f32") -> float32 [P, rows] through the kernel: w an
    expert stack [E, rows, row_bytes], expert int [P], x [P / k, cols]: row i for the k pairs i·k ..
    i·k + k − 1 (k = 1: a row per pair; k > 1: each token's row to its k experts, prepared once).
    Derivatives: the dequantized map (a custom_jvp; its tangent is plain XLA, so reverse mode
    transposes it). Under vmap the batch becomes more pairs (one launch, as for one longer prompt)."""
    if jnp.ndim(expert) != 1:
        raise ValueError(f"expert_qmatvec_fast: expert must be integer [pairs], got shape {jnp.shape(expert)}")
    pairs, n_x = jnp.shape(expert)[0], jnp.shape(x)[0] if jnp.ndim(x) == 2 else 0
    if not n_x or pairs % n_x:
        raise ValueError(f"expert_qmatvec_fast: x of shape {jnp.shape(x)} must be [rows, cols] with rows "
                         f"dividing the {pairs} pairs")
    check_experts(w, x, jnp.reshape(expert, (n_x, -1)), "expert_qmatvec_fast")
    if not qm.supported(w.fmt, act, "f32", w.shape[1]):
        raise ValueError(f"no kernel for {w.fmt} experts {w.shape} with act={act!r}; kernels take act in "
                         f"{', '.join(qm.acts_for(w.fmt)) or '(none)'}, cols a multiple of {qm.CHUNK}")
    return _fast(act, config, interpret, w, jnp.asarray(x), jnp.asarray(expert, jnp.int32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fast(act, config, interpret, w, x, expert):
    return _vmappable(act, config, interpret)(w, x, expert)


@_fast.defjvp
def _fast_jvp(act, config, interpret, primals, tangents):
    w, x, expert = primals
    tangent = dequantized_experts(w, tangents[1], expert.reshape(x.shape[0], -1))     # [P / k, k, rows]
    return _fast(act, config, interpret, w, x, expert), tangent.reshape(expert.shape[0], -1)


@functools.lru_cache(maxsize=None)
def _vmappable(act, config, interpret):
    """_apply with a vmap rule: batched pairs are flattened into one longer list of pairs (batched
    weights: one launch per batch element, in sequence), instead of the grid axis Pallas would add."""

    @jax.custom_batching.custom_vmap
    def apply(w, x, expert):
        return _apply(act, config, interpret, w, x, expert)

    @apply.def_vmap
    def rule(axis_size, in_batched, w, x, expert):
        full = lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)  # noqa: E731
        xb, eb = in_batched[1:]
        if in_batched[0].data:
            return jax.lax.map(lambda a: apply(QTensor(a[0], w.fmt, w.shape), a[1], a[2]),
                               (w.data, full(x, xb), full(expert, eb))), True
        pairs = expert.shape[-1]
        y = apply(w, full(x, xb).reshape(-1, w.shape[1]), full(expert, eb).reshape(-1))
        return y.reshape(axis_size, pairs, w.shape[0]), True

    return apply


def _apply(act, config, interpret, w: QTensor, x, expert):
    pairs = expert.shape[0]
    k = pairs // x.shape[0]
    cfg = tile_config(w, act, pairs, config)
    slot, tile_expert = group_by_expert(expert, w.data.shape[0], cfg.tokens)
    n_rows = tile_expert.shape[0] * cfg.tokens
    if n_rows == pairs:                                   # a tile per pair, in pair order
        src = None if k == 1 else k
    else:                                                 # each tile row's pair's row of x (-1 stays -1)
        src = tile_sources(slot, n_rows) // k
    y = qm.qmatmul(w.data, w.fmt, w.shape, x.astype(jnp.float32), tile_expert, act, cfg, interpret, src)
    return from_tiles(y, slot)


def moe_ffn(x, idx, weights, gate: QTensor, up: QTensor, down: QTensor, act: str = "f32", *,
            glu=silu_glu, config: qm.Config | None = None, interpret: bool = False):
    """sum_j weights[t, j] · down_e(glu(gate_e · x_t, up_e · x_t)), e = idx[t, j], for x [T, d], idx
    int [T, k], weights [T, k] and expert stacks gate, up [E, d_ff, d], down [E, d, d_ff] -> float32
    [T, d]. Every product in mode act (float32 accumulation) through expert_qmatvec_fast, glu and the
    weighted sum over k in float32 (the sum as numlab.ops.moe_sum: einsum at HIGHEST)."""
    t, k = idx.shape
    expert = idx.reshape(-1)
    product = functools.partial(expert_qmatvec_fast, expert=expert, act=act, config=config, interpret=interpret)
    h = glu(product(gate, x), product(up, x))
    out = product(down, h).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", out, weights.astype(jnp.float32), precision=_HI,
                      preferred_element_type=jnp.float32)
