"""qmatvec through the Pallas kernel: the signature and results of numlab.ops.qmatvec (to float rounding).

y[..., r] = W · x[..., cols] in mode `act`, float32 accumulation. Batch axes of w.data (stacked
matrices) and of x broadcast like numpy's matmul. Derivatives are those of the dequantized linear
map, as in the reference (a custom_jvp, so forward and reverse mode both work): the tangent W·t and
its transpose, the transposed product of the cotangent with the dequantized weights, run in XLA
(a pallas_call has no transpose rule).
"""
import dataclasses
import functools
import math
import os

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np

from numlab.formats import QTensor
from numlab.kernels import qmatmul as qm
from numlab.kernels import tuning

_HI = jax.lax.Precision.HIGHEST


def enabled() -> bool:
    """Whether the kernels run natively here (a GPU backend); elsewhere numlab uses the reference."""
    return jax.default_backend() == "gpu"


MODES = ("auto", "off", "always")


def mode() -> str:
    """The NUMLAB_KERNELS environment variable, read when a function is traced: "auto" (default: the
    kernels on a GPU where they pay), "off" (the reference everywhere) or "always" (the kernels
    wherever they apply, natively on a GPU, in Pallas' CPU interpreter elsewhere: for tests)."""
    value = os.environ.get("NUMLAB_KERNELS", "auto")
    if value not in MODES:
        raise ValueError(f"NUMLAB_KERNELS={value!r}; valid: {', '.join(MODES)}")
    return value


def use_for(w: QTensor, act: str, acc: str, n_tokens: int) -> bool:
    """Whether numlab.ops routes qmatvec(w, x, act, acc) with n_tokens rows of x (per matrix) to a kernel:
    mode() "auto" on a GPU where a kernel applies and tuning.pays, "always" where one applies."""
    m = mode()
    if m == "off" or not applies(w, act, acc):
        return False
    return m == "always" or (enabled() and tuning.pays(act, n_tokens))


def applies(w: QTensor, act: str, acc: str) -> bool:
    """Whether qmatvec_fast computes qmatvec(w, ., act, acc) (format, modes and shape supported)."""
    return isinstance(w, QTensor) and qm.supported(w.fmt, act, acc, w.shape[1])


def qmatvec_fast(w: QTensor, x, act: str = "f32", acc: str = "f32", *, config: qm.Config | None = None,
                 interpret: bool = False):
    """numlab.ops.qmatvec(w, x, act, acc) -> float32 [..., rows] through the kernel. ValueError where
    it does not apply (see applies); interpret=True runs the kernel in Pallas' CPU interpreter."""
    if not isinstance(w, QTensor):
        raise TypeError(f"qmatvec_fast weights must be a numlab.formats.QTensor, got {type(w).__name__}")
    if not applies(w, act, acc):
        raise ValueError(f"no kernel for {w.fmt} weights {w.shape} with act={act!r} acc={acc!r}; kernels "
                         f"take act in {', '.join(qm.acts_for(w.fmt)) or '(none)'}, acc f32, cols a multiple "
                         f"of {qm.CHUNK}")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"qmatvec_fast: x of shape {x.shape} must end in cols={w.shape[1]} of the {w.fmt} "
                         f"weight {w.shape}")
    return _fast(act, config, interpret, w, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fast(act, config, interpret, w, x):
    return _vmappable(act, config, interpret)(w, x)


@functools.lru_cache(maxsize=None)
def _vmappable(act, config, interpret):
    """_apply with a vmap rule: a vmapped axis becomes a leading batch axis of x and of the weight
    stack, which the kernel takes as more tokens or more matrices, instead of the grid axis Pallas
    would add (Triton grids have at most three axes, and nested vmaps would add more)."""

    @jax.custom_batching.custom_vmap
    def apply(w, x):
        return _apply(act, config, interpret, w, x)

    @apply.def_vmap
    def rule(axis_size, in_batched, w, x):
        w_batched, x_batched = in_batched[0].data, in_batched[1]
        batch_w = w.data.shape[int(w_batched):-2]
        batch_x = x.shape[int(x_batched):-1]
        rank = max(len(batch_w), len(batch_x))

        def lead(a, batched, inner, tail):
            """a as [B or 1, 1 ..., *inner, *tail] with len(inner) padded to rank."""
            return a.reshape((a.shape[0] if batched else 1,) + (1,) * (rank - len(inner)) + inner + tail)

        if not w_batched and not batch_w:        # one matrix: the batch is more tokens
            return apply(w, x), True
        data = lead(w.data, w_batched, batch_w, w.data.shape[-2:])
        return apply(QTensor(data, w.fmt, w.shape), lead(x, x_batched, batch_x, x.shape[-1:])), True

    return apply


@_fast.defjvp
def _fast_jvp(act, config, interpret, primals, tangents):
    w, x = primals
    return _fast(act, config, interpret, w, x), _dequantized_map(w, tangents[1])


def _dequantized_map(w: QTensor, v):
    """W · v with the dequantized weights, float32 at HIGHEST precision: the reference's tangent map,
    whose transpose (reverse mode) is the transposed product with the dequantized weights."""
    return jnp.einsum("...rc,...c->...r", w.dequantize(), v.astype(jnp.float32), precision=_HI,
                      preferred_element_type=jnp.float32)


def _apply(act, config, interpret, w: QTensor, x):
    rows, cols = w.shape
    batch_w = w.data.shape[:-2]
    if not batch_w:
        lead = x.shape[:-1]
        xs = x.reshape(-1, cols)
        cfg = qm.fit(config or tuning.config_for(w.fmt, act, xs.shape[0], rows, cols), rows, cols)
        n_tiles = -(-xs.shape[0] // cfg.tokens)
        xs = jnp.pad(xs, ((0, n_tiles * cfg.tokens - xs.shape[0]), (0, 0)))
        y = qm.qmatmul(w.data[None], w.fmt, w.shape, xs, jnp.zeros((n_tiles,), jnp.int32),
                       act, cfg, interpret)
        return y[:math.prod(lead)].reshape(lead + (rows,))
    lead = jnp.broadcast_shapes(batch_w, x.shape[:-1])
    which = np.broadcast_to(np.arange(math.prod(batch_w)).reshape(batch_w), lead).reshape(-1)
    xs = jnp.broadcast_to(x, lead + (cols,)).reshape(-1, cols)
    cfg = config or tuning.config_for(w.fmt, act, 1, rows, cols, matrices=xs.shape[0])
    cfg = qm.fit(dataclasses.replace(cfg, tokens=1), rows, cols)
    data = w.data.reshape((-1,) + w.data.shape[-2:])
    y = qm.qmatmul(data, w.fmt, w.shape, xs, jnp.asarray(which, jnp.int32), act, cfg, interpret)
    return y.reshape(lead + (rows,))
