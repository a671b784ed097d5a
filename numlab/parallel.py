"""Multi-device execution: a batch axis sharded over all visible devices (shard_map over a 1-D mesh)
and expert-parallel placement of stacked expert weights. Values are unchanged; only placement is."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = "batch"
EXPERT = "expert"


def mesh(axis: str = BATCH, devices=None) -> Mesh:
    """A 1-D mesh named `axis` over `devices` (default: all visible devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (axis,))


def _pad(x, size):
    """x with its leading axis extended to `size` by repeating the last row (finite, discarded later)."""
    extra = size - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


@functools.lru_cache(maxsize=64)
def _runner(fn, m: Mesh, block: int):
    def local(rows, shared):
        return jax.lax.map(lambda x: fn(x, shared), rows, batch_size=block)
    return jax.jit(jax.shard_map(local, mesh=m, in_specs=(P(BATCH), P()), out_specs=P(BATCH)))


def sharded_map(fn, batch, shared=(), *, block: int = 8, chunk: int | None = None, devices=None):
    """`fn(example, shared)` for every example along the leading axis of the pytree `batch`, with the
    batch split over devices; returns the stacked results.

    Each device maps fn over its rows `block` at a time (`jax.lax.map(..., batch_size=block)`, a vmap
    inside), so every example runs through the same compiled program whatever the device count or
    `chunk`: results are bit-identical from 1 to N devices. `chunk` bounds the rows per call (rounded
    up to a multiple of devices x block); padding repeats the last example and is dropped.
    `shared` (e.g. the model) is replicated on every device.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("sharded_map needs a batch with at least one array leaf")
    n = leaves[0].shape[0]
    if any(leaf.shape[:1] != (n,) for leaf in leaves):
        raise ValueError(f"batch leaves must share the leading axis; got shapes {[l.shape for l in leaves]}")
    for name, value in (("block", block), ("chunk", chunk)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive number of rows, got {value!r}")
    m = mesh(BATCH, devices)
    nd = m.devices.size
    unit = nd * block
    step = -(-min(chunk or n, n) // unit) * unit
    spec = NamedSharding(m, P(BATCH))
    run = _runner(fn, m, block)
    shared = jax.device_put(shared, NamedSharding(m, P()))
    outs = []
    for start in range(0, n, step):
        part = jax.tree.map(lambda x: _pad(jnp.asarray(x[start:start + step]), step), batch)
        out = run(jax.device_put(part, spec), shared)
        outs.append(jax.tree.map(lambda y: y[:min(step, n - start)], out))
    return outs[0] if len(outs) == 1 else jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)


def _is_expert_leaf(path) -> bool:
    return any(str(getattr(k, "key", getattr(k, "name", ""))).endswith("_exps") for k in path)


def place_experts(tree, devices=None):
    """tree with every array under a `*_exps` key split along its expert axis (third from last:
    [..., E, rows, cols or row_bytes]) over a 1-D "expert" mesh, and every other array replicated."""
    m = mesh(EXPERT, devices)
    nd = m.devices.size

    def put(path, x):
        if not _is_expert_leaf(path):
            return jax.device_put(x, NamedSharding(m, P()))
        if x.ndim < 3 or x.shape[-3] % nd:
            raise ValueError(f"{jax.tree_util.keystr(path)}: shape {x.shape} has no expert axis (third from "
                             f"last) divisible by the {nd} devices")
        return jax.device_put(x, NamedSharding(m, P(*([None] * (x.ndim - 3)), EXPERT, None, None)))

    return jax.tree_util.tree_map_with_path(put, tree)

