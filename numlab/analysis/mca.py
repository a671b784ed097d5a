"""Monte Carlo arithmetic (as in Verificarlo's random-rounding mode and CADNA): perturb chosen op
outputs by a random relative error at a virtual precision of t bits, repeat over PRNG keys, and read
the spread of the results as significant bits.

Perturbation: y -> y·(1 + 2^-t·u), u ~ U(-1, 1) independently per element, in y's dtype: the size of
one rounding error of a t-bit significand, drawn at random (applied once per op output, not per
elementary float operation inside the op). A single perturbed op leaves s = t + log2(√3) bits.

Significant bits, per element over the samples: s = −log2(σ / |μ|) (Stott Parker's formula, as
Verificarlo reports it), σ the sample standard deviation (ddof 1), μ the sample mean; s is clipped to
[0, max_bits] (σ = 0 gives max_bits). Per layer we report the median over tokens and channels, and
the normwise s = −log2(‖σ‖₂ / ‖μ‖₂) per token averaged over tokens.
"""
import jax
import jax.numpy as jnp
import numpy as np

from numlab.analysis import metrics
from numlab.ops.precision import perturb


def significant_bits(mean, std, max_bits: float = 53.0):
    """s = −log2(std / |mean|) elementwise, clipped to [0, max_bits] (std = 0 -> max_bits), float64."""
    mean, std = np.abs(np.asarray(mean, np.float64)), np.asarray(std, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = -np.log2(std / mean)
    return np.clip(np.where(std == 0, max_bits, np.nan_to_num(s, nan=0.0, neginf=0.0)), 0.0, max_bits)


def moments(diffs, exact):
    """(μ, σ) of samples given as diffs [K, ...] = sample − exact (no cancellation when σ is far below
    |μ|): μ = exact + mean(diffs), σ the standard deviation of diffs (ddof 1). float64 numpy."""
    d = np.asarray(diffs, np.float64)
    return np.asarray(exact, np.float64) + d.mean(0), d.std(0, ddof=1)


def layer_bits(diffs, exact, max_bits: float = 53.0) -> dict:
    """Significant bits per leading axis of exact [L, ..., D] (layers of the residual stream, or chain
    steps) from diffs [K, L, ..., D] = samples − exact. median: of elementwise s over everything but L;
    normwise: mean over the middle axes of −log2(‖σ‖/‖μ‖) over the last axis D."""
    mu, sd = moments(diffs, exact)
    s = significant_bits(mu, sd, max_bits)
    norm = significant_bits(np.linalg.norm(mu, axis=-1), np.linalg.norm(sd, axis=-1), max_bits)
    return {"median": np.median(s.reshape(s.shape[0], -1), axis=-1),
            "normwise": norm.reshape(norm.shape[0], -1).mean(-1)}


def topk_change_probability(topk_samples, topk_exact):
    """Per layer, the share of (sample, token) whose top-k expert set differs from the unperturbed
    run's: topk_samples int [K, L, T, k], topk_exact [L, T, k] -> [L]."""
    samples = jnp.asarray(topk_samples)
    changed = np.asarray(metrics.swaps(jnp.broadcast_to(jnp.asarray(topk_exact), samples.shape), samples)) > 0
    return changed.mean(axis=(0, 2))


def chain(ws, x, keys, bits):
    """Op-level MCA: a chain of N float64 matvecs (ws [N, d, d]) with L2 normalisation between, each
    matvec output perturbed at `bits`, one chain per key of keys [K]. (samples [K, N, d], exact [N, d])."""
    n = ws.shape[0]

    def run(key, noisy):
        def step(state, wk):
            w, k = wk
            y = jnp.einsum("rc,c->r", w, state, precision=jax.lax.Precision.HIGHEST)
            y = perturb(y, k, bits) if noisy else y
            y = y / jnp.linalg.norm(y)
            return y, y
        return jax.lax.scan(step, jnp.asarray(x, jnp.float64), (ws, jax.random.split(key, n)))[1]
    return jax.vmap(lambda k: run(k, True))(keys), run(keys[0], False)
