"""TF32 guard: every dot in numlab.ops states precision=HIGHEST and, with float32 inputs on the backend
at hand, lands at float32 error (~1e-7) against float64 — not TF32's ~1e-3 (NVIDIA's default)."""
import ggml_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax.extend
from jax import lax

from numlab import ops
from numlab.formats import QTensor

RNG = np.random.default_rng(2024)
HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


def _f32(*shape, scale=1.0):
    return jnp.asarray(RNG.standard_normal(shape) * scale, jnp.float32)


def _ggml_qtensor(fmt, rows, cols):
    raw = ggml_oracle.quantize(np.asarray(_f32(rows, cols, scale=0.05)), fmt)
    return QTensor.from_bytes(jnp.asarray(raw), fmt, (rows, cols))


W_Q4K = _ggml_qtensor("q4_k", 32, 4096)
W_Q80 = _ggml_qtensor("q8_0", 32, 4096)
W_F32 = QTensor.from_float(_f32(32, 4096), "f32")
X = _f32(2, 4096)
Q, K, V = _f32(48, 8, 128), _f32(48, 2, 128), _f32(48, 2, 128)
E, G = _f32(4, 8, 512), jnp.asarray(RNG.random((4, 8)), jnp.float32)


def _qmv(w, act, acc="f32"):
    return lambda x: ops.qmatvec(w, x, act, acc)


def _jvp(acc):
    return lambda x: jax.jvp(_qmv(W_Q4K, "f32", acc), (x,), (x[::-1],))[1]


def _grad(acc):
    return jax.grad(lambda x: jnp.sum(jnp.sin(ops.qmatvec(W_Q4K, x, "f32", acc))))


# name -> (the op in float32, the same op in float64, arguments)
DOT_PATHS = {
    "qmatvec f32 weights act=f32": (_qmv(W_F32, "f32"), _qmv(W_F32, "f32", "f64"), (X,)),
    **{f"qmatvec q4_k act={a}": (_qmv(W_Q4K, a), _qmv(W_Q4K, a, "f64"), (X,)) for a in ("f32", "q8_k", "q8_1")},
    **{f"qmatvec q8_0 act={a}": (_qmv(W_Q80, a), _qmv(W_Q80, a, "f64"), (X,)) for a in ("f32", "q8_0")},
    "qmatvec jvp tangent": (_jvp("f32"), _jvp("f64"), (X,)),
    "qmatvec grad": (_grad("f32"), _grad("f64"), (X,)),
    **{f"attention order={o}": (lambda q, k, v, o=o: ops.attention(q, k, v, "f32", o),
                                lambda q, k, v, o=o: ops.attention(q, k, v, "f64", o), (Q, K, V)) for o in ops.ORDERS},
    **{f"moe_sum order={o}": (lambda e, g, o=o: ops.moe_sum(e, g, "f32", o),
                              lambda e, g, o=o: ops.moe_sum(e, g, "f64", o), (E, G)) for o in ops.ORDERS},
}
OTHER_OPS = {
    "rmsnorm": (lambda x: ops.rmsnorm(x, x[0], 1e-6), (X,)),
    "softmax": (ops.softmax, (X,)),
    "swiglu": (lambda x: ops.swiglu(x, x[::-1], exp="exp2"), (X,)),
    "rope": (lambda q: ops.rope(q, jnp.arange(48), 1e6), (Q,)),
    "route": (lambda x: ops.route(x[:, :128], 8), (X,)),
}


def _eqns(jaxpr):
    """All equations of a jaxpr, its sub-jaxprs' (a Pallas kernel's body included)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("name", list(DOT_PATHS) + list(OTHER_OPS))
def test_every_float_dot_states_highest(name):
    fn, args = OTHER_OPS[name] if name in OTHER_OPS else DOT_PATHS[name][::2]
    with jax.default_matmul_precision("tensorfloat32"):  # a dot without its own precision would take this
        eqns = list(_eqns(jax.make_jaxpr(fn)(*args).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    kernel = any(e.primitive.name == "pallas_call" for e in eqns)    # on a GPU: may use multiply-adds only
    explicit_sums = name in OTHER_OPS or name.endswith(("order=pairwise", "order=sequential"))
    assert kernel or bool(dots) != explicit_sums, f"{name}: {len(dots)} dot_general found"
    for eqn in dots:
        if all(jnp.issubdtype(v.aval.dtype, jnp.integer) for v in eqn.invars):
            assert eqn.params["preferred_element_type"] == jnp.int32, f"{name}: integer dot not accumulating in int32"
        else:
            assert eqn.params["precision"] == HIGHEST, f"{name}: float dot with precision {eqn.params['precision']}"


@pytest.mark.parametrize("name", list(DOT_PATHS))
def test_f32_dots_are_float32_accurate_on_backend(name, record_property):
    fn32, fn64, args = DOT_PATHS[name]
    with jax.default_matmul_precision("tensorfloat32"):
        got = np.asarray(jax.jit(fn32)(*args), np.float64)
    ref = np.asarray(jax.jit(fn64)(*args), np.float64)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    record_property("measured", f"f32 vs f64 rel err {err:.3g} on {jax.default_backend()}")
    assert err < 1e-5, f"{name} on {jax.default_backend()}: f32 vs f64 rel err {err:.3g} (TF32 would give ~1e-3)"
