"""numlab's products against ggml's CUDA times, as a figure: the matvec and moe benchmark results of one
device run, one bar per case as numlab.ops runs it (ggml's time over ours, and our weights' read rate
over the copy bandwidth).
matplotlib with the Agg backend; the file written atomically."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from numlab.bench import matvec as mv, moe  # noqa: E402
from numlab.kernels import tuning  # noqa: E402
from numlab.io import atomic_savefig  # noqa: E402

ACT_COLORS = {"q8_1": "C0", "q8_k": "C1", "f32": "C2", "bf16": "C3", "f16": "C4"}


def routed_path(case: mv.Case) -> str:
    """"kernel" or "XLA": where numlab.ops sends the case on a GPU (kernels.use_for, by tokens per matrix)."""
    per_matrix = moe.tokens_per_expert(case.n) if case.what == "mul_mat_id" else case.n
    return "kernel" if tuning.pays(case.act, per_matrix) else "XLA"


def against_ggml(results: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows, untimed): one row per case that ggml timed, for the path numlab.ops routes it to (the kernel
    in its tuned config, a sweep's first variant, or XLA's reference; cold weights, device time): ours_us,
    ggml_us, ggml_over_ours and ours' of_copy_bandwidth; untimed: the cases whose routed path has no timing
    in results."""
    rows, untimed = [], []
    for result in results:
        for c in result["cases"]:
            case = mv.Case(**c["case"])
            ggml = mv.ggml_time_us(case)
            if ggml is None:
                continue
            path = routed_path(case)
            entry = (c.get("variants") or [None])[0] if path == "kernel" else c.get("reference")
            ours = mv.cold_us_or_nan(entry)
            if not np.isfinite(ours):
                untimed.append(case.name)
                continue
            rows.append({"case": case.name, "act": case.act, "path": path, "ours_us": ours, "ggml_us": ggml,
                         "ggml_over_ours": ggml / ours, "of_copy_bandwidth": entry["cold"]["of_copy_bandwidth"]})
    return rows, untimed


def title(results: list[dict]) -> str:
    """The figure's title: where ggml's times come from, and the device and JAX version of ours."""
    devices = sorted({r.get("device", "?") for r in results})
    return (f"numlab against ggml CUDA ({mv.ggml_source()}); ours on {', '.join(devices)}, "
            f"jax {results[0].get('jax_version', '?')}; cold weights")


def plot_against_ggml(rows: list[dict], path, title: str):
    """Two panels over the cases of against_ggml: ggml's time / ours (log scale, 1 = ggml's speed) and the
    weights' read rate as a fraction of the measured copy bandwidth."""
    y = np.arange(len(rows))[::-1]
    colors = [ACT_COLORS.get(r["act"], "C7") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.6), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    ratios = np.array([r["ggml_over_ours"] for r in rows])
    left.barh(y, ratios, color=colors)
    left.axvline(1.0, color="k", lw=1)
    left.set_xscale("log")
    for yi, r in zip(y, rows):
        left.text(r["ggml_over_ours"] * 1.03, yi, f"{r['ggml_over_ours']:.2f} ({r['path']})", va="center", fontsize=7)
    lo, hi = min(0.5, ratios.min() / 1.5), max(2.0, ratios.max() * 1.6)
    left.set_xlim(lo, hi)
    ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8) if lo <= t <= hi]
    left.set_xticks(ticks, [f"{t:g}" for t in ticks])
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.set_xlabel("ggml CUDA's time (its q8_1 arithmetic) / numlab's (> 1: numlab faster)")
    left.set_yticks(y, [r["case"] for r in rows], fontsize=7)
    right.barh(y, [r["of_copy_bandwidth"] for r in rows], color=colors)
    right.axvline(1.0, color="k", lw=1, ls=":")
    right.set_xlabel("numlab's packed-weight read rate / copy bandwidth")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x", which="both")
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for act, col in ACT_COLORS.items()
               if any(r["act"] == act for r in rows)]
    right.legend(handles, [a for a in ACT_COLORS if any(r["act"] == a for r in rows)], title="act", fontsize=7,
                 loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return out
