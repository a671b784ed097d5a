"""A MoE layer's experts with the tokens grouped by expert: no Python loop over experts.

The T·k (token, expert) pairs are sorted by expert and laid out in tiles of `tokens` rows, each tile
holding pairs of one expert only (ragged groups padded per expert), so one kernel launch per
projection multiplies every tile by its expert's quantized weights and a prompt costs what the
distinct experts it touches cost. Results are numlab.ops.qmatvec per pair (to float rounding).
"""
import jax
import jax.numpy as jnp

from numlab.formats import QTensor
from numlab.kernels import qmatmul as qm
from numlab.kernels import tuning

_HI = jax.lax.Precision.HIGHEST


def silu_glu(gate, up):
    """silu(gate) · up in float32, as numlab.ops.swiglu(gate, up, "f32", "exp")."""
    return gate / (1 + jnp.exp(-gate)) * up


def group_by_expert(idx, n_experts: int, tokens: int):
    """Tiles for the pairs of idx int [T, k]: (slot int32 [T·k], row of each pair in the tiled layout;
    tile_expert int32 [n_tiles], expert of each tile, -1 for unused tiles). n_tiles is static: the
    most tiles T·k pairs over n_experts experts can need."""
    pairs = idx.size
    e = idx.reshape(-1).astype(jnp.int32)
    if tokens == 1:                                  # a tile per pair: no sorting
        return jnp.arange(pairs, dtype=jnp.int32), e
    n_tiles = (pairs + min(n_experts, pairs) * (tokens - 1)) // tokens
    counts = jnp.zeros((n_experts,), jnp.int32).at[e].add(1)
    tiles = -(-counts // tokens)
    first_tile = jnp.cumsum(tiles) - tiles
    first_pair = jnp.cumsum(counts) - counts
    order = jnp.argsort(e, stable=True)
    rank = jnp.zeros((pairs,), jnp.int32).at[order].set(jnp.arange(pairs, dtype=jnp.int32)) - first_pair[e]
    tile = first_tile[e] + rank // tokens
    slot = tile * tokens + rank % tokens
    tile_expert = jnp.full((n_tiles,), -1, jnp.int32).at[tile].set(e)
    return slot, tile_expert


def to_tiles(rows, slot, n_rows: int):
    """Pair rows [T·k, d] laid out by group_by_expert's slots as [n_rows, d], zeros between groups
    (one-pair tiles: the rows themselves)."""
    if n_rows == rows.shape[0]:
        return rows
    return jnp.zeros((n_rows, rows.shape[1]), rows.dtype).at[slot].set(rows)


def from_tiles(tiled, slot):
    """The pairs' rows [T·k, d] back from the tiled layout."""
    return tiled if tiled.shape[0] == slot.shape[0] else tiled[slot]


def expert_matmul(w: QTensor, xs_tiled, tile_expert, act: str, cfg: qm.Config, interpret: bool):
    """Rows laid out by group_by_expert [n_tiles·tokens, cols] times their tiles' experts of the stack
    w (data [E, rows, row_bytes]) in mode act -> float32 [n_tiles·tokens, rows]."""
    return qm.qmatmul(w.data, w.fmt, w.shape, qm.prepare(xs_tiled, act), tile_expert, act, cfg, interpret)


def moe_ffn(x, idx, weights, gate: QTensor, up: QTensor, down: QTensor, act: str = "f32", *,
            glu=silu_glu, config: qm.Config | None = None, interpret: bool = False):
    """sum_j weights[t, j] · down_e(glu(gate_e · x_t, up_e · x_t)), e = idx[t, j], for x [T, d], idx
    int [T, k], weights [T, k] and expert stacks gate, up [E, d_ff, d], down [E, d, d_ff] -> float32
    [T, d]. Every product in mode act (float32 accumulation), glu and the weighted sum over k in
    float32 (the sum as numlab.ops.moe_sum: einsum at HIGHEST)."""
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(w, QTensor) or w.data.ndim != 3 or not qm.supported(w.fmt, act, "f32", w.shape[1]):
            raise ValueError(f"moe_ffn: {name} must be a QTensor expert stack [E, rows, row_bytes] in a "
                             f"format and shape a kernel takes with act={act!r}; got "
                             f"{getattr(w, 'fmt', type(w).__name__)} {getattr(w, 'data', None).shape if isinstance(w, QTensor) else ''}")
    t, k = idx.shape
    n_experts = gate.data.shape[0]
    cfg = qm.fit(config or tuning.config_for(gate.fmt, act, max(1, t * k // n_experts), *gate.shape),
                 *gate.shape)
    slot, tile_expert = group_by_expert(idx, n_experts, cfg.tokens)
    xs = to_tiles(jnp.repeat(x.astype(jnp.float32), k, axis=0), slot, tile_expert.shape[0] * cfg.tokens)
    h = glu(expert_matmul(gate, xs, tile_expert, act, cfg, interpret),
            expert_matmul(up, xs, tile_expert, act, cfg, interpret))
    out = from_tiles(expert_matmul(down, h, tile_expert, act, cfg, interpret), slot).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", out, weights.astype(jnp.float32), precision=_HI,
                      preferred_element_type=jnp.float32)
