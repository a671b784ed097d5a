"""Multi-device execution: a batch axis sharded over all visible devices (shard_map over a 1-D mesh)
and expert-parallel placement of stacked expert weights. Values are unchanged; only placement is."""
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


def _runner(fn, m: Mesh, block: int):
    def local(rows, shared):
        return jax.lax.map(lambda x: fn(x, shared), rows, batch_size=block)
    # check_vma off: fn runs per device with no collectives, and scans whose carry starts replicated
    # (the model's residual stream) and turns batch-varying would otherwise fail the type check.
    return jax.jit(jax.shard_map(local, mesh=m, in_specs=(P(BATCH), P()), out_specs=P(BATCH), check_vma=False))


def sharded(fn, *, block: int = 8, devices=None):
    """`apply(batch, shared=(), *, chunk=None)`: `fn(example, shared)` for every example along the
    leading axis of the pytree `batch`, the batch split over devices, results stacked.

    Each device maps fn over its rows `block` at a time (`jax.lax.map(..., batch_size=block)`, a vmap
    inside), so every example runs through the same compiled program whatever the device count or
    `chunk`: results are bit-identical from 1 to N devices. `chunk` bounds the rows per call (rounded
    up to a multiple of devices x block); padding repeats the last example and is dropped. `shared`
    (e.g. the model) is replicated on every device. apply compiles once per shape and is meant to be
    reused across chunks; pass big arrays through `shared`, not fn's closure (they would be constants).
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive number of rows, got {block!r}")
    m = mesh(BATCH, devices)
    unit = m.devices.size * block
    spec, replicated = NamedSharding(m, P(BATCH)), NamedSharding(m, P())
    run = _runner(fn, m, block)

    def apply(batch, shared=(), *, chunk: int | None = None):
        leaves = jax.tree.leaves(batch)
        if not leaves:
            raise ValueError("sharded: the batch needs at least one array leaf")
        n = leaves[0].shape[0]
        if any(leaf.shape[:1] != (n,) for leaf in leaves):
            raise ValueError(f"batch leaves must share the leading axis; got shapes {[x.shape for x in leaves]}")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive number of rows, got {chunk!r}")
        step = -(-min(chunk or n, n) // unit) * unit
        shared = jax.device_put(shared, replicated)
        outs = []
        for start in range(0, n, step):
            part = jax.tree.map(lambda x: _pad(jnp.asarray(x[start:start + step]), step), batch)
            out = run(jax.device_put(part, spec), shared)
            outs.append(jax.tree.map(lambda y: y[:min(step, n - start)], out))
        return outs[0] if len(outs) == 1 else jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)

    return apply


def sharded_map(fn, batch, shared=(), *, block: int = 8, chunk: int | None = None, devices=None):
    """sharded(fn, block=block, devices=devices)(batch, shared, chunk=chunk), for a single call."""
    return sharded(fn, block=block, devices=devices)(batch, shared, chunk=chunk)


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

