"""SiLU and SwiGLU in a chosen dtype, with exp or the exp2 route GPUs take."""
import math

import jax.numpy as jnp
from jax import lax

from numlab.ops.precision import EXPS, check, jdtype


def silu(x, dtype: str = "f32", exp: str = "exp"):
    """x / (1 + e^-x) in `dtype`. exp="exp2" computes e^-x as 2^(-x·log2 e) with the product rounded
    to `dtype` first, the route of CUDA's fast expf (ex2.approx). The product passes an optimization
    barrier: XLA lowers exp2(t) as exp(t·ln 2) and, under jit, would fold log2(e)·ln 2 into exp(-x)."""
    check("exp", exp, EXPS)
    dt = jdtype(dtype)
    x = jnp.asarray(x).astype(dt)
    if exp == "exp":
        e = jnp.exp(-x)
    else:
        e = jnp.exp2(lax.optimization_barrier(-x * jnp.asarray(math.log2(math.e), dt)))
    return x / (jnp.asarray(1, dt) + e)


def swiglu(gate, up, dtype: str = "f32", exp: str = "exp"):
    """silu(gate) · up in `dtype` (the gated unit of the experts' feed-forward)."""
    return silu(gate, dtype, exp) * jnp.asarray(up).astype(jdtype(dtype))
