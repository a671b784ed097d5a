"""Precision names the ops accept, and their JAX dtypes."""
import jax
import jax.numpy as jnp

from numlab.formats._common import low_value

DTYPES = ("f64", "f32", "bf16", "f16")
ACTS = ("f64", "f32", "bf16", "f16", "q8_k", "q8_1", "q8_0")
ACCS = ("f64", "f32")
ORDERS = ("xla", "pairwise", "sequential")
EXPS = ("exp", "exp2")

_JDTYPES = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def check(name: str, value: str, valid: tuple) -> str:
    """`value` if it is one of `valid`, else ValueError naming the bad value and the valid ones."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def jdtype(name: str):
    """The JAX dtype of a float precision name (f64 f32 bf16 f16); f64 requires jax_enable_x64."""
    if check("dtype", name, DTYPES) == "f64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("precision 'f64' needs float64: call jax.config.update('jax_enable_x64', True) "
                         "before making arrays (without it JAX would silently compute in float32)")
    return _JDTYPES[name]


def rounded(x, name: str):
    """x rounded to float precision `name`, as a value of that precision (f64, f32) or, for bf16 and f16,
    as float32 read back from the rounded bits (`low_value`: XLA may drop an f32 -> bf16/f16 -> f32 pair)."""
    x = jnp.asarray(x)
    if name in ("bf16", "f16"):
        return low_value(x.astype(jdtype(name)))
    return x.astype(jdtype(name))


def perturb(y, key, bits):
    """y·(1 + 2^-bits·u), u ~ U(-1, 1) per element, in y's dtype: Monte Carlo arithmetic's random
    rounding at `bits` (bits may be traced)."""
    y = jnp.asarray(y)
    u = jax.random.uniform(key, y.shape, y.dtype, -1.0, 1.0)
    return y * (1 + jnp.exp2(-jnp.asarray(bits, y.dtype)) * u)
