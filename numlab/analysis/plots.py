"""PNG plots of an attribution report (the dict report.build makes, or report.json parsed back):
1 - cos per layer for each run, stacked attribution per layer, the layer × token swap map and the
router margin histogram. matplotlib with the Agg backend; files written atomically."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from numlab.io import atomic_savefig  # noqa: E402

STACK_GROUPS = 7  # groups drawn separately in the stacked attribution; the rest are summed as "other"


def _arr(x):
    return np.array(x, dtype=np.float64)  # None (JSON null) becomes nan


def cosine_per_layer(rep):
    """1 - cos of the residual stream per layer (log scale): the low run (mean and worst token), the low
    run with the reference's expert choices forced, and any compared policies."""
    lay = rep["layers"]
    x = np.arange(len(lay["one_minus_cos"]))
    fig, ax = plt.subplots(figsize=(10, 4))
    low = rep["meta"].get("low_name", rep["meta"]["low"])
    ax.plot(x, _arr(lay["one_minus_cos"]), "o-", label=f"{low} (mean over tokens)")
    ax.plot(x, 1 - _arr(lay["cos_min"]), "v:", color="C0", alpha=0.6, label=f"{low} (worst token)")
    ax.plot(x, _arr(lay["forced_one_minus_cos"]), "s--", label=f"{low}, reference expert choices forced")
    for i, (name, c) in enumerate(rep.get("compare", {}).items()):
        ax.plot(x, _arr(c["one_minus_cos"]), "^-", color=f"C{i + 2}", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("1 − cos(residual stream, reference)")
    ax.set_title(f"Cosine per layer against {rep['meta'].get('ref_name', rep['meta']['ref'])}")
    ax.set_xticks(x)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def attribution_per_layer(rep):
    """Stacked bars per layer: each group's integrated-gradient share of 1 - cos (reference routing),
    then the part the expert swaps add (free minus forced); dots: the free low run's 1 - cos."""
    groups = rep["attribution"]["groups"]
    lay = rep["layers"]
    n_layers = len(lay["one_minus_cos"])
    x = np.arange(n_layers)
    shown = groups[:STACK_GROUPS]
    rows = [(g["name"], _arr(g["ig_omc"])) for g in shown]
    if len(groups) > STACK_GROUPS:
        rows.append(("other", np.sum([_arr(g["ig_omc"]) for g in groups[STACK_GROUPS:]], axis=0)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pos, neg = np.zeros(n_layers), np.zeros(n_layers)
    for i, (name, v) in enumerate(rows):
        v = np.nan_to_num(v)
        base = np.where(v >= 0, pos, neg)
        ax.bar(x, v, bottom=base, color=f"C{i % 10}", label=name)
        pos, neg = pos + np.maximum(v, 0), neg + np.minimum(v, 0)
    routing = np.nan_to_num(_arr(lay["routing"]))
    ax.bar(x, routing, bottom=np.where(routing >= 0, pos, neg), color="white", edgecolor="k", hatch="//",
           label="expert swaps (free − forced)")
    ax.plot(x, _arr(lay["one_minus_cos"]), "ko", label="1 − cos, free routing")
    ax.set_xlabel("layer")
    ax.set_ylabel("1 − cos attributed")
    ax.set_title("Attribution per layer (integrated gradients, reference routing forced)")
    ax.set_xticks(x)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def swap_map(rep):
    """Experts swapped per layer (rows) and token (columns, prompts side by side, white lines between)."""
    sw = np.array(rep["tokens"]["swaps"])                      # [P, L, T]
    p, n_layers, t = sw.shape
    img = np.transpose(sw, (1, 0, 2)).reshape(n_layers, p * t)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.12 * p * t), 1.5 + 0.35 * n_layers))
    k = rep["layers"]["k"]
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="magma_r", vmin=0, vmax=max(1, int(img.max())))
    for i in range(1, p):
        ax.axvline(i * t - 0.5, color="w", lw=1.5)
    ax.set_xlabel(f"token ({p} prompts × {t})")
    ax.set_ylabel("layer")
    ax.set_title(f"Experts swapped out of the reference top-{k}: {int(sw.sum())} in {int((sw > 0).sum())} sets")
    fig.colorbar(im, ax=ax, label="experts swapped")
    fig.tight_layout()
    return fig


def margin_histogram(rep):
    """Histogram of the reference's router margins (k-th minus (k+1)-th logit) over all layers and
    tokens, the choices that the low run changed stacked in another colour."""
    m = _arr(rep["tokens"]["margin_ref"]).ravel()
    flipped = np.array(rep["tokens"]["swaps"]).ravel() > 0
    pos = m[np.isfinite(m) & (m > 0)]
    lo = max(pos.min() if pos.size else 1e-6, 1e-6)
    hi = max(pos.max() if pos.size else 1.0, lo * 10)
    bins = np.geomspace(lo, hi, 30)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([m[~flipped], m[flipped]], bins=bins, stacked=True, color=["C0", "C3"],
            label=["kept", f"changed in the low run ({int(flipped.sum())})"])
    ax.set_xscale("log")
    ax.set_xlabel("reference router margin (k-th − (k+1)-th logit)")
    ax.set_ylabel("token-layer choices")
    ax.set_title("Router margins")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PLOTS = {"cosine_per_layer.png": cosine_per_layer, "attribution_per_layer.png": attribution_per_layer,
         "swap_map.png": swap_map, "margin_histogram.png": margin_histogram}


def write_all(run_dir, rep) -> dict:
    """Every plot of PLOTS as a PNG in run_dir; {file name: path}."""
    out = {}
    for name, make in PLOTS.items():
        fig = make(rep)
        try:
            out[name] = atomic_savefig(fig, Path(run_dir) / name, dpi=110)
        finally:
            plt.close(fig)
    return out
