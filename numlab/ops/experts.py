"""Quantized products of a MoE layer's chosen (token, expert) pairs: no loop over experts.

expert_qmatvec(w, x, expert)[t, j] = qmatvec(W_{expert[t, j]}, x[t] or x[t, j]) for each token's top-k
experts. Three ways, one function (to float rounding):
- GPU kernel (numlab.kernels.moe): the pairs sorted by expert into tiles of `tokens` rows, each tile
  one expert's pairs (ragged groups padded per expert); a launch per projection reads each tile's
  expert from the packed stack, so a prompt costs what the distinct experts it touches cost.
- Grouped reference (other accelerators): the same tiles, every expert prepared once (dequantized or
  unpacked), each tile's expert gathered from that for qmatvec's product.
- Dense reference (CPU: small models): every expert on every row in one product, the chosen picked.
  XLA:CPU runs that as large matrix products with the weights shared by a vmapped batch; its gathers
  and small batched products make the grouped layout slower there at the sizes a CPU runs (the tiny
  main job, timed once on a 2-core host: 108 s grouped, 40 s dense).
"""
import functools

import jax
import jax.numpy as jnp

from numlab.formats import QTensor
from numlab.ops.precision import check
from numlab.ops.qmatvec import check_modes, prepared, product

_HI = jax.lax.Precision.HIGHEST


def group_by_expert(expert, n_experts: int, tokens: int):
    """Tiles for the pairs' experts int [P]: (slot int32 [P], the row of each pair in the tiled layout;
    tile_expert int32 [n_tiles], the expert of each tile, -1 for unused tiles). n_tiles is static: the
    most tiles P pairs over n_experts experts can need."""
    pairs = expert.shape[0]
    e = expert.astype(jnp.int32)
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
    """Pair rows [P, d] laid out by group_by_expert's slots as [n_rows, d], zeros between groups
    (one-pair tiles: the rows themselves)."""
    if n_rows == rows.shape[0]:
        return rows
    # The slots are distinct, so an add is a set, and its transpose (reverse mode) is a gather.
    return jnp.zeros((n_rows, rows.shape[1]), rows.dtype).at[slot].add(rows)


def tile_sources(slot, n_rows: int):
    """int32 [n_rows]: the pair in each row of group_by_expert's tiled layout, -1 between groups (the
    inverse of slot, for gathering the pairs into tiles: to_tiles(rows, slot, n_rows)[i] = rows[src[i]])."""
    return jnp.full((n_rows,), -1, jnp.int32).at[slot].set(jnp.arange(slot.shape[0], dtype=jnp.int32))


def from_tiles(tiled, slot):
    """The pairs' rows [P, d] back from the tiled layout."""
    return tiled if tiled.shape[0] == slot.shape[0] else tiled[slot]


def reference_tokens(pairs: int, n_experts: int) -> int:
    """Rows per tile of the reference: the power of two at least the mean pairs per expert."""
    return 1 << max(0, -(-pairs // n_experts) - 1).bit_length()


def check_experts(w: QTensor, x, expert, where: str = "expert_qmatvec"):
    """ValueError unless w is an expert stack [E, rows, cols], expert int [T, k] and x float [T, cols]
    (each token's row to its k experts) or [T, k, cols] (a row per pair)."""
    if not isinstance(w, QTensor) or w.data.ndim != 3:
        got = f"{w.fmt} data {w.data.shape}" if isinstance(w, QTensor) else type(w).__name__
        raise ValueError(f"{where}: weights must be a QTensor expert stack [E, rows, row_bytes], got {got}")
    if jnp.ndim(expert) != 2 or not jnp.issubdtype(jnp.result_type(expert), jnp.integer):
        raise ValueError(f"{where}: expert must be integer [tokens, k], got {jnp.result_type(expert)} "
                         f"{jnp.shape(expert)}")
    t, k = jnp.shape(expert)
    if jnp.shape(x) not in ((t, w.shape[1]), (t, k, w.shape[1])):
        raise ValueError(f"{where}: x of shape {jnp.shape(x)} must be [{t}, {w.shape[1]}] or "
                         f"[{t}, {k}, {w.shape[1]}] for expert {(t, k)} and cols={w.shape[1]}")


def expert_qmatvec(w: QTensor, x, expert, act: str = "f32", acc: str = "f32"):
    """y[t, j] = qmatvec(W_{expert[t, j]}, x[t] (x [T, cols]) or x[t, j] (x [T, k, cols]), act, acc) for an
    expert stack w (data [E, rows, row_bytes]) and expert int [T, k] -> [T, k, rows]. The Pallas kernel
    on a GPU where numlab.kernels.use_for says so, else a reference; derivatives as qmatvec's (the
    dequantized map)."""
    from numlab import kernels   # numlab.kernels imports numlab.ops

    check_experts(w, x, expert)
    check_modes(w.fmt, act, acc, "experts")
    x, expert = jnp.asarray(x), jnp.asarray(expert, jnp.int32)
    t, k = expert.shape
    if kernels.use_for(w, act, acc, n_tokens=max(1, t * k // w.data.shape[0])):
        y = kernels.expert_qmatvec_fast(w, x.reshape(-1, x.shape[-1]), expert.reshape(-1), act,
                                        interpret=not kernels.enabled())
        return y.reshape(t, k, -1)
    return reference(w, x, expert, act, acc)


def _pair_rows(x, k: int):
    """x [T, cols] (each token's row to its k experts) or [T, k, cols] -> the pairs' rows [T·k, cols]."""
    return jnp.broadcast_to(x[:, None, :] if x.ndim == 2 else x, (x.shape[0], k, x.shape[-1])).reshape(-1, x.shape[-1])


def _dense(fn, wp, x, expert):
    """fn(wp, rows) of every expert on every row, then each pair's expert picked: [T, k, rows]."""
    if x.ndim == 2:
        y = fn(wp, x[:, None, :])                                               # [T, E, rows]
        return jnp.take_along_axis(y, expert[:, :, None], axis=1)
    y = fn(wp, x[:, :, None, :])                                                # [T, k, E, rows]
    return jnp.take_along_axis(y, expert[:, :, None, None], axis=2)[:, :, 0]


def _grouped(fn, wp, x, expert, n_experts: int):
    """fn of each tile's rows with its expert's prepared weights gathered from wp: [T, k, rows]."""
    t, k = expert.shape
    cols = x.shape[-1]
    pairs = _pair_rows(x, k)
    tokens = reference_tokens(t * k, n_experts)
    slot, tile_expert = group_by_expert(expert.reshape(-1), n_experts, tokens)
    n_tiles = tile_expert.shape[0]
    xt = to_tiles(pairs, slot, n_tiles * tokens).reshape(n_tiles, tokens, cols)
    y = jax.vmap(fn)(jax.tree.map(lambda a: a[jnp.maximum(tile_expert, 0)], wp), xt)
    return from_tiles(y.reshape(n_tiles * tokens, -1), slot).reshape(t, k, -1)


LAYOUTS = ("dense", "grouped")


def default_layout() -> str:
    """The reference's layout here: dense on a CPU, grouped elsewhere (module docstring)."""
    return "dense" if jax.default_backend() == "cpu" else "grouped"


def _layout(fn, wp, x, expert, n_experts, layout):
    return _dense(fn, wp, x, expert) if layout == "dense" else _grouped(fn, wp, x, expert, n_experts)


def reference(w: QTensor, x, expert, act: str = "f32", acc: str = "f32", layout: str | None = None):
    """expert_qmatvec's reference in `layout` (LAYOUTS; None: default_layout())."""
    layout = check("layout", layout or default_layout(), LAYOUTS)
    check_experts(w, x, expert, "experts.reference")
    return _reference(act, acc, layout, w, jnp.asarray(x), jnp.asarray(expert, jnp.int32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _reference(act, acc, layout, w: QTensor, x, expert):
    """qmatvec's product on every expert's weights prepared once."""
    fn = lambda wp, rows: product(wp, w.fmt, rows, act, acc)  # noqa: E731
    return _layout(fn, prepared(w, act), x, expert, w.data.shape[0], layout)


@_reference.defjvp
def _reference_jvp(act, acc, layout, primals, tangents):
    w, x, expert = primals
    y = _reference(act, acc, layout, w, x, expert)
    return y, dequantized_experts(w, tangents[1], expert, y.dtype, layout)


def dequantized_experts(w: QTensor, x, expert, dtype=jnp.float32, layout: str | None = None):
    """The pairs' products with the dequantized experts, products and sums in dtype at HIGHEST
    precision ([T, k, rows], the reference's layout): expert_qmatvec's tangent map, linear in x."""
    fn = lambda wd, rows: jnp.einsum("...rc,...c->...r", wd, rows.astype(dtype), precision=_HI,  # noqa: E731
                                     preferred_element_type=dtype)
    return _layout(fn, w.dequantize().astype(dtype), x, expert, w.data.shape[0], layout or default_layout())
