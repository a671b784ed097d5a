"""A MoE layer's experts with the tokens grouped by expert: no Python loop over experts.

The T·k (token, expert) pairs are sorted by expert and laid out in tiles of `tokens` rows, each tile
holding pairs of one expert only (ragged groups padded per expert), so one kernel launch per
projection multiplies every tile by its expert's quantized weights and a prompt costs what the
distinct experts it touches cost. Results are numlab.ops.qmatvec per pair (to float rounding).
"""
import functools

import jax
import jax.custom_batching
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
    float32 (the sum as numlab.ops.moe_sum: einsum at HIGHEST). Under vmap the batch becomes more
    tokens (one launch per projection, as for one prompt)."""
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(w, QTensor) or w.data.ndim != 3 or not qm.supported(w.fmt, act, "f32", w.shape[1]):
            got = f"{w.fmt} data {w.data.shape}" if isinstance(w, QTensor) else type(w).__name__
            raise ValueError(f"moe_ffn: {name} must be a QTensor expert stack [E, rows, row_bytes] in a "
                             f"format and shape a kernel takes with act={act!r}; got {got}")
    return _vmappable(act, glu, config, interpret)(x, idx, weights, gate, up, down)


@functools.lru_cache(maxsize=None)
def _vmappable(act, glu, config, interpret):
    """The layer with a vmap rule: batched tokens are flattened into one longer prompt (weights
    batched too: one layer per batch element, in sequence), instead of the grid axis Pallas would add."""

    @jax.custom_batching.custom_vmap
    def layer(x, idx, weights, gate, up, down):
        return _layer(x, idx, weights, gate, up, down, act, glu, config, interpret)

    @layer.def_vmap
    def rule(axis_size, in_batched, x, idx, weights, gate, up, down):
        xb, ib, wb = in_batched[:3]
        if any(w.data for w in in_batched[3:]):
            unbatch = lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            args = [unbatch(a, b) for a, b in zip((x, idx, weights), (xb, ib, wb))]
            stacks = [QTensor(unbatch(w.data, b.data), w.fmt, w.shape) for w, b in zip((gate, up, down), in_batched[3:])]
            return jax.lax.map(lambda a: layer(*a), (*args, *stacks)), True
        t = idx.shape[-2]
        flat = lambda a, b, tail: (a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)).reshape((-1,) + tail)
        y = layer(flat(x, xb, x.shape[-1:]), flat(idx, ib, idx.shape[-1:]), flat(weights, wb, weights.shape[-1:]),
                  gate, up, down)
        return y.reshape(axis_size, t, -1), True

    return layer


def _layer(x, idx, weights, gate, up, down, act, glu, config, interpret):
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
