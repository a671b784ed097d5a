"""Divergence metrics between a reference run and a low-precision run: residual-stream closeness per
layer and token, top-k expert swaps, router margins, and llama-perplexity's --kl-divergence
statistics on the final logits.

Array metrics are jnp functions (jit-, vmap- and differentiable) computed in float64 when
jax_enable_x64 is on, else float32; the summaries (`kld_stats`, `percentiles`) are numpy float64.
"""
import jax
import jax.numpy as jnp
import numpy as np

# The percentiles llama-perplexity prints, as fractions (its "Median" is the 0.5 one).
KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001)
DP_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001)


def _wide(x):
    """x as float64 when x64 is enabled, else float32."""
    return jnp.asarray(x).astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def cosine(a, b):
    """cos of the angle between a and b along the last axis; 0 where either is the zero vector."""
    a, b = _wide(a), _wide(b)
    na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
    dot = jnp.sum(a * b, axis=-1)
    return jnp.where((na > 0) & (nb > 0), dot / jnp.where(na * nb > 0, na * nb, 1), 0)


def one_minus_cos(a, b):
    """1 - cos(a, b) along the last axis, as ||a/|a| - b/|b|||^2 / 2 (no cancellation near cos = 1);
    1 where either vector is zero."""
    a, b = _wide(a), _wide(b)
    na = jnp.linalg.norm(a, axis=-1, keepdims=True)
    nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
    ok = (na > 0) & (nb > 0)
    d = a / jnp.where(ok, na, 1) - b / jnp.where(ok, nb, 1)
    return jnp.where(ok[..., 0], 0.5 * jnp.sum(d * d, axis=-1), 1)


def rel_l2(low, ref):
    """||low - ref|| / ||ref|| along the last axis (inf where ref is zero and low is not, 0 if both are)."""
    low, ref = _wide(low), _wide(ref)
    num = jnp.linalg.norm(low - ref, axis=-1)
    den = jnp.linalg.norm(ref, axis=-1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.where(num > 0, jnp.inf, 0))


def max_abs_diff(a, b):
    """max |a - b| along the last axis."""
    return jnp.max(jnp.abs(_wide(a) - _wide(b)), axis=-1)


def _overlap(idx_ref, idx_low):
    """Number of experts the two top-k sets (last axis, distinct indices each) share."""
    idx_ref, idx_low = jnp.asarray(idx_ref), jnp.asarray(idx_low)
    if idx_ref.shape != idx_low.shape:
        raise ValueError(f"top-k index shapes differ: {idx_ref.shape} vs {idx_low.shape}")
    if not (jnp.issubdtype(idx_ref.dtype, jnp.integer) and jnp.issubdtype(idx_low.dtype, jnp.integer)):
        raise TypeError(f"expert indices must be integer, got {idx_ref.dtype} and {idx_low.dtype}")
    return jnp.sum(jnp.any(idx_ref[..., :, None] == idx_low[..., None, :], axis=-1), axis=-1)


def swaps(idx_ref, idx_low):
    """Experts of the reference top-k set missing from the low run's set, per token (int, 0..k).
    Order within a set does not count."""
    return jnp.asarray(idx_ref).shape[-1] - _overlap(idx_ref, idx_low)


def jaccard(idx_ref, idx_low):
    """|A ∩ B| / |A ∪ B| of the two top-k expert sets per token (1 when equal)."""
    k = jnp.asarray(idx_ref).shape[-1]
    inter = _wide(_overlap(idx_ref, idx_low))
    return inter / (2 * k - inter)


def set_margin(logits, idx):
    """Smallest router logit inside the expert set idx[..., k] minus the largest outside it; > 0 exactly
    when idx is the top-k set, and equal to the k-th minus (k+1)-th logit then."""
    logits, idx = _wide(logits), jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"expert indices must be integer, got {idx.dtype}")
    inside = jnp.any(jnp.arange(logits.shape[-1]) == idx[..., :, None], axis=-2)
    lo_in = jnp.min(jnp.where(inside, logits, jnp.inf), axis=-1)
    hi_out = jnp.max(jnp.where(inside, -jnp.inf, logits), axis=-1)
    return lo_in - hi_out


def log_softmax(logits):
    """log of the softmax over the last axis, in the wide dtype."""
    return jax.nn.log_softmax(_wide(logits), axis=-1)


def kld(logits_ref, logits_low):
    """KL(p_ref || p_low) per token over the last axis: sum p_ref (log p_ref - log p_low), exact (no
    16-bit storage or -16 log-prob cut-off as in llama-perplexity's base-logit file)."""
    return _kld_of_log_probs(log_softmax(logits_ref), log_softmax(logits_low))


def _kld_of_log_probs(lr, ll):
    return jnp.sum(jnp.exp(lr) * (lr - ll), axis=-1)


def argmax_agree(logits_ref, logits_low):
    """Whether both runs' most likely next token (argmax of the logits) is the same, per token."""
    return jnp.argmax(jnp.asarray(logits_ref), axis=-1) == jnp.argmax(jnp.asarray(logits_low), axis=-1)


def target_prob_diff(logits_ref, logits_low, targets):
    """Δp = p_low(target) - p_ref(target) per token: the change of the probability of the token that
    actually follows (llama-perplexity's Δp)."""
    return _dp_of_log_probs(log_softmax(logits_ref), log_softmax(logits_low), targets)


def _dp_of_log_probs(lr, ll, targets):
    t = jnp.asarray(targets)[..., None]
    return jnp.exp(jnp.take_along_axis(ll, t, axis=-1))[..., 0] - jnp.exp(jnp.take_along_axis(lr, t, axis=-1))[..., 0]


def mean_and_uncertainty(values):
    """(mean, standard error) as llama-perplexity computes them: sqrt((E[x^2] - E[x]^2) / (n - 1)),
    reported as 0 when that variance is not positive or n <= 10. numpy float64."""
    v = np.asarray(values, np.float64).ravel()
    n = v.size
    if n < 1:
        return 0.0, 0.0
    mean = float(np.sum(v) / n)
    var = float(np.sum(v * v) / n) - mean * mean
    return mean, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def percentiles(values, fractions):
    """{fraction: value} with linear interpolation between sorted values at fraction·(n - 1)
    (llama-perplexity's rule; its median is the same number). numpy float64."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size == 0:
        raise ValueError("percentiles of an empty array")
    out = {}
    for f in fractions:
        if not 0 <= f <= 1:
            raise ValueError(f"percentile fraction {f} outside [0, 1]")
        p = f * (v.size - 1)
        i = int(np.floor(p))
        j = min(i + 1, v.size - 1)
        out[f] = float((1 - (p - i)) * v[i] + (p - i) * v[j])
    return out


def kld_stats(logits_ref, logits_low, targets) -> dict:
    """llama-perplexity --kl-divergence statistics with ref as the base model, over all tokens given
    (logits [..., V]; targets [...] the token that follows each position): mean KLD ± standard error,
    KLD min/max/percentiles, mean Δp ±, Δp percentiles, RMS Δp ±, same top token share ±."""
    lr, ll = log_softmax(logits_ref), log_softmax(logits_low)  # once each, for the KLD and for Δp
    k = np.asarray(_kld_of_log_probs(lr, ll), np.float64).ravel()
    dp = np.asarray(_dp_of_log_probs(lr, ll, targets), np.float64).ravel()
    same = np.asarray(argmax_agree(logits_ref, logits_low)).ravel()
    n = k.size
    kld_mean, kld_unc = mean_and_uncertainty(k)
    dp_mean, dp_unc = mean_and_uncertainty(dp)
    mse, mse_unc = mean_and_uncertainty(dp * dp)
    rms = float(np.sqrt(mse))
    top = float(np.mean(same))
    return {
        "n_tokens": n,
        "kld_mean": kld_mean, "kld_unc": kld_unc,
        "kld_max": float(k.max()), "kld_min": float(k.min()),
        "kld_percentiles": {f"{100 * f:g}": v for f, v in percentiles(k, KLD_PERCENTILES).items()},
        "dp_mean": dp_mean, "dp_unc": dp_unc,
        "dp_max": float(dp.max()), "dp_min": float(dp.min()),
        "dp_percentiles": {f"{100 * f:g}": v for f, v in percentiles(dp, DP_PERCENTILES).items()},
        "dp_rms": rms, "dp_rms_unc": 0.5 / rms * mse_unc if rms > 0 else 0.0,
        "same_top": top, "same_top_unc": float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else 0.0,
    }
