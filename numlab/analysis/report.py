"""The attribution report: every number of an `attribution.analyze` result as JSON-able data
(report.json), and a Markdown summary that leads with what a reader wants (report.md).
Numbers are float64; the JSON parses back with `load`."""
import json
import re
from pathlib import Path

import numpy as np

from numlab.analysis import attribution, metrics
from numlab.io import atomic_write_json, atomic_write_text

TOP_GROUPS = 8      # groups shown in the Markdown tables
TOP_SWAPS = 10      # flipped router choices listed in the Markdown


_WORDS = {
    "act": lambda v: f"activations quantized to {v}" if v.startswith("q") else f"activations rounded to {v}",
    "acc": lambda v: f"accumulation in {v}",
    "dtype": lambda v: f"computed in {v}",
    "order": lambda v: f"{v} summation order",
    "exp": lambda v: f"exp computed as {v}",
}


def _word(field: str, value: str) -> str:
    return _WORDS[field](value) if field in _WORDS else f"{field} {value}"


def gloss(cause: str) -> str:
    """Plain words for a cause of attribution.describe_groups: "matvec act f32→q8_k" -> "matvec:
    activations quantized to q8_k (reference f32)"."""
    parts = []
    for alt in cause.split(" | "):
        kind, _, rest = alt.partition(" ")
        changes = re.findall(r"(\w+) (\w+)→(\w+)", rest)
        if not changes:
            return cause
        parts.append(f"{kind}: " + ", ".join(f"{_word(f, b)} (reference {a})" for f, a, b in changes))
    return "; ".join(parts)


def _f(x):
    """A float, or None where it is not finite (JSON null)."""
    v = float(np.asarray(x, np.float64))
    return v if np.isfinite(v) else None


def _lst(x):
    """Nested lists of floats, None where not finite."""
    a = np.asarray(x, np.float64)
    return np.where(np.isfinite(a), a, None).tolist()


def _layers(res) -> dict:
    """Per-layer closeness of the low run to the reference (means over prompts and tokens)."""
    r0, r1, k = res["ref"], res["low"], res["meta"]["k"]
    omc = np.asarray(metrics.one_minus_cos(r1["resid"], r0["resid"]))
    cos = np.asarray(metrics.cosine(r1["resid"], r0["resid"]))
    sw = np.asarray(metrics.swaps(r0["topk_idx"], r1["topk_idx"]))
    jac = np.asarray(metrics.jaccard(r0["topk_idx"], r1["topk_idx"]))
    free, forced = res["low_summary"]["omc"], res["forced"]["omc"]
    with np.errstate(divide="ignore", invalid="ignore"):
        routing_share = np.where(free > 0, (free - forced) / free, np.nan)
    return dict(
        one_minus_cos=_lst(omc.mean(axis=(0, 2))), cos_mean=_lst(cos.mean(axis=(0, 2))),
        cos_min=_lst(cos.min(axis=(0, 2))),
        rel_l2=_lst(np.asarray(metrics.rel_l2(r1["resid"], r0["resid"])).mean(axis=(0, 2))),
        max_abs=_lst(np.asarray(metrics.max_abs_diff(r1["resid"], r0["resid"])).max(axis=(0, 2))),
        swaps=_lst(sw.sum(axis=(0, 2))), changed_share=_lst((sw > 0).mean(axis=(0, 2))),
        jaccard=_lst(jac.mean(axis=(0, 2))),
        forced_one_minus_cos=_lst(forced), routing=_lst(free - forced), routing_share=_lst(routing_share),
        margin_ref_median=_lst(np.median(np.asarray(metrics.set_margin(r0["router_logits"], r0["topk_idx"])),
                                         axis=(0, 2))),
        k=k)


def _tokens(res) -> dict:
    """Per prompt, layer and token [P][L][T]: 1 - cos, swaps, router margins (reference set) in the
    reference, the forced low run and the free low run."""
    r0, r1 = res["ref"], res["low"]
    return dict(
        one_minus_cos=_lst(metrics.one_minus_cos(r1["resid"], r0["resid"])),
        swaps=np.asarray(metrics.swaps(r0["topk_idx"], r1["topk_idx"])).tolist(),
        margin_ref=_lst(metrics.set_margin(r0["router_logits"], r0["topk_idx"])),
        margin_forced=_lst(res["forced"]["margin"]),
        margin_low=_lst(metrics.set_margin(r1["router_logits"], r0["topk_idx"])),
        token_ids=np.asarray(res["tokens"]).tolist())


def _logits(res) -> dict:
    """llama-perplexity --kl-divergence statistics over every position with a following token, and
    the next-token argmax after each prompt."""
    r0, r1, tok = res["ref"], res["low"], res["tokens"]
    stats = metrics.kld_stats(r0["logits"][:, :-1], r1["logits"][:, :-1], tok[:, 1:])
    nxt_ref = np.argmax(r0["logits"][:, -1], axis=-1)
    nxt_low = np.argmax(r1["logits"][:, -1], axis=-1)
    stats["next_token"] = [dict(prompt=p, ref=int(a), low=int(b), agree=bool(a == b))
                           for p, (a, b) in enumerate(zip(nxt_ref, nxt_low))]
    stats["next_token_agree"] = int(np.sum(nxt_ref == nxt_low))
    return stats


def _swaps(res, order) -> dict:
    """Which groups moved the reference set's router margin at each flipped choice: integrated
    gradients of the margin along the forced path, per group."""
    r0, r1, names = res["ref"], res["low"], res["groups"].names
    sw = np.asarray(metrics.swaps(r0["topk_idx"], r1["topk_idx"]))
    flipped = sw > 0
    ig = np.asarray(res["ig"]["margin"], np.float64)              # [G, P, L, T]
    m_ref = np.asarray(metrics.set_margin(r0["router_logits"], r0["topk_idx"]))
    m_low = np.asarray(metrics.set_margin(r1["router_logits"], r0["topk_idx"]))
    m_forced = np.asarray(res["forced"]["margin"])
    where = np.argwhere(flipped)
    moves = ig[:, flipped]                                         # [G, n_flips]
    with np.errstate(divide="ignore", invalid="ignore"):
        sh = moves / np.sum(moves, axis=0, keepdims=True)
    mean_share = np.nanmean(sh, axis=1) if sh.shape[1] else np.full(len(names), np.nan)
    top = np.argmax(-moves, axis=0) if moves.shape[1] else np.zeros(0, int)
    items = []
    for j, (p, l, t) in enumerate(where):
        best = np.argsort(moves[:, j])[:3]
        items.append(dict(prompt=int(p), layer=int(l), token=int(t),
                          swaps=int(sw[p, l, t]),
                          margin_ref=_f(m_ref[p, l, t]), margin_forced=_f(m_forced[p, l, t]),
                          margin_low=_f(m_low[p, l, t]), attributed=_f(np.sum(moves[:, j])),
                          movers=[dict(group=names[g], move=_f(moves[g, j]), share=_f(sh[g, j])) for g in best]))
    items.sort(key=lambda d: d["margin_low"])
    return dict(n_flipped=int(flipped.sum()), n_choices=int(flipped.size),
                mean_share={names[g]: _f(mean_share[g]) for g in order},
                top_mover_counts={names[g]: int(np.sum(top == g)) for g in order},
                flips=items)


def _removed(free, forced):
    """(free - forced) / free: the part of a divergence that forcing the reference's routing removes."""
    return None if free is None or forced is None or free == 0 else (free - forced) / free


def build(res, meta=None) -> dict:
    """Every number of an analyze result as JSON-able data (see the module docstring of report)."""
    names, causes = res["groups"].names, res["causes"]
    ig_omc = np.asarray(res["ig"]["omc"], np.float64)             # [G, L]
    total = ig_omc.sum(axis=1)
    share = attribution.shares(total)
    lin = np.asarray(res["linear"]["omc"], np.float64)
    lin_share = attribution.shares(lin.sum(axis=1))
    ig_kld = np.asarray(res["ig"]["kld"], np.float64)
    kld_share = attribution.shares(ig_kld)
    order = [int(g) for g in np.argsort(-np.nan_to_num(share, nan=-np.inf), kind="stable")]
    abl, loo = res["ablation"], res["leave_one_out"]
    groups = [dict(
        name=names[g], cause=causes[names[g]], sites=list(res["groups"].members(g)),
        share=_f(share[g]), ig_omc=_lst(ig_omc[g]), ig_omc_sum=_f(total[g]),
        share_kld=_f(kld_share[g]), ig_kld=_f(ig_kld[g]),
        linear_omc=_lst(lin[g]), linear_share=_f(lin_share[g]),
        first_order_omc=_lst(res["first_order"]["omc"][g]), first_order_kld=_f(res["first_order"]["kld"][g]),
        ablation=dict(omc=_lst(abl["omc"][g]), kld=_f(abl["kld"][g]), swaps=_lst(abl["swaps"][g]),
                      margin=_lst(abl["margin"][g])),
        leave_one_out=dict(omc=_lst(loo["omc"][g]), kld=_f(loo["kld"][g]), swaps=_lst(loo["swaps"][g]),
                           margin=_lst(loo["margin"][g])),
    ) for g in order]
    rollup = {}
    for g in order:
        c = rollup.setdefault(causes[names[g]], dict(cause=causes[names[g]], share=0.0, share_kld=0.0, groups=[]))
        c["share"] += _f(np.nan_to_num(share[g]))
        c["share_kld"] += _f(np.nan_to_num(kld_share[g]))
        c["groups"].append(names[g])
    rollup = sorted(rollup.values(), key=lambda c: -c["share"])
    omc_free, omc_forced = res["low_summary"]["omc"], res["forced"]["omc"]
    kld_free, kld_forced = _f(res["low_summary"]["kld"]), _f(res["forced"]["kld"])
    clo = attribution.closure(ig_omc, 0.0, omc_forced)
    clo_sum = attribution.closure(total, 0.0, np.sum(omc_forced))
    clo_kld = attribution.closure(ig_kld, 0.0, kld_forced)
    layers = _layers(res)
    logits = _logits(res)
    swaps = _swaps(res, order)
    inc = np.diff(np.concatenate([[0.0], np.asarray(layers["one_minus_cos"], np.float64)]))
    drops = [dict(layer=int(l), one_minus_cos=layers["one_minus_cos"][l], increase=_f(inc[l]),
                  cos_mean=layers["cos_mean"][l], cos_min=layers["cos_min"][l])
             for l in np.argsort(-inc)[:3] if inc[l] > 0]
    worst = int(np.argmax(layers["one_minus_cos"]))
    n_free, n_forced = _f(np.sum(omc_free)), _f(np.sum(omc_forced))
    return dict(
        meta={**res["meta"], **(meta or {}), "groups": list(names)},
        headline=dict(
            drop_layers=drops, worst_layer=worst, worst_layer_cos=layers["cos_mean"][worst],
            worst_token_cos=layers["cos_min"][worst],
            leading_cause=rollup[0] if rollup else None,
            leading_group=groups[0]["name"] if groups else None,
            leading_group_share=groups[0]["share"] if groups else None,
            swaps=int(np.sum(layers["swaps"])), changed_choices=swaps["n_flipped"],
            choices=swaps["n_choices"],
            routing_share=_removed(n_free, n_forced),
            closure_rel_gap=_f(clo_sum["rel_gap"]),
            next_token_agree=logits["next_token_agree"], n_prompts=res["meta"]["n_prompts"],
            kld_mean=logits["kld_mean"], same_top=logits["same_top"]),
        layers=layers,
        tokens=_tokens(res),
        logits=logits,
        attribution=dict(
            target="1 - cos of the residual stream after each layer, mean over prompts and tokens; "
                   "attributed by integrated gradients along m = t·1 with the reference's expert choices forced",
            groups=groups, causes=rollup,
            closure=dict(omc={k: _lst(v) for k, v in clo.items()},
                         omc_sum={k: _f(v) for k, v in clo_sum.items()},
                         kld={k: _f(v) for k, v in clo_kld.items()}),
            routing=dict(omc_free=_lst(omc_free), omc_forced=_lst(omc_forced), share=layers["routing_share"],
                         sum_share=_removed(n_free, n_forced), kld_free=kld_free, kld_forced=kld_forced,
                         kld_share=_removed(kld_free, kld_forced), forced_swaps=int(res["forced"]["swaps"])),
            swaps=swaps,
            zero_gradient=dict(max_abs_omc=_f(np.max(np.abs(res["zero_grad"]["omc"]))),
                               max_abs_kld=_f(np.max(np.abs(res["zero_grad"]["kld"])))),
        ),
        compare={name: dict(policy=c["policy"], one_minus_cos=_lst(c["one_minus_cos"]), swaps=_lst(c["swaps"]),
                            kld=_f(c["kld"])) for name, c in res.get("compare", {}).items()},
    )


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _c(x) -> str:
    return "n/a" if x is None else f"{x:.6f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(rep: dict) -> str:
    """report.md: headline first (layers where cosine drops, top causes with shares, swap count),
    then the tables behind it."""
    m, h, lay, att, lg = rep["meta"], rep["headline"], rep["layers"], rep["attribution"], rep["logits"]
    out = [f"# Divergence of `{m.get('low_name', m['low'])}` from `{m.get('ref_name', m['ref'])}`", ""]
    out.append(f"Model: {m.get('model', 'n/a')}. Prompts: {m['n_prompts']} × {m['n_tokens']} tokens"
               f"{' (' + m['prompts'] + ')' if m.get('prompts') else ''}. Sites: {m['n_sites']}, grouped by "
               f"{m['by']}. Integrated gradients: {m['ig_points']} {m['rule']} nodes.")
    out += ["", "## Headline", ""]
    if h["drop_layers"]:
        parts = [f"layer {d['layer']} (1 − cos {_g(d['one_minus_cos'])}, +{_g(d['increase'])})" for d in h["drop_layers"]]
        out.append(f"- **Cosine drops** most at {', '.join(parts)}. Worst layer {h['worst_layer']}: mean cos "
                   f"{_c(h['worst_layer_cos'])}, worst token cos {_c(h['worst_token_cos'])}.")
    lc = h["leading_cause"]
    if lc:
        top = ", ".join(f"{g['name']} {_pct(g['share'])}" for g in att["groups"][:3])
        out.append(f"- **Leading cause: {lc['cause']}** ({gloss(lc['cause'])}) — {_pct(lc['share'])} of the "
                   f"attributed 1 − cos (summed over layers, reference routing); top groups: {top}.")
    out.append(f"- **Expert swaps**: {h['changed_choices']} of {h['choices']} token-layer top-{lay['k']} sets "
               f"changed ({h['swaps']} experts swapped). Forcing the reference's choices removes "
               f"{_pct(h['routing_share'])} of the summed 1 − cos: that part is caused by the swaps.")
    out.append(f"- **Next token**: argmax after the prompt agrees on {h['next_token_agree']}/{h['n_prompts']} "
               f"prompts; same top token at {_pct(h['same_top'])} of positions; mean KLD {_g(h['kld_mean'])}.")
    out.append(f"- **Closure**: group attributions sum to the forced-routing change within "
               f"{_pct(h['closure_rel_gap'])}.")
    out += ["", "## Layers", "",
            "| layer | mean cos | 1 − cos | worst token cos | rel L2 | max abs diff | sets changed | "
            "1 − cos, reference routing | share from swaps |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for l in range(len(lay["cos_mean"])):
        out.append(f"| {l} | {_c(lay['cos_mean'][l])} | {_g(lay['one_minus_cos'][l])} | {_c(lay['cos_min'][l])} | "
                   f"{_g(lay['rel_l2'][l])} | {_g(lay['max_abs'][l])} | {_pct(lay['changed_share'][l])} | "
                   f"{_g(lay['forced_one_minus_cos'][l])} | {_pct(lay['routing_share'][l])} |")
    if rep["compare"]:
        out += ["", "Further policies against the same reference (1 − cos per layer, experts swapped, mean KLD):", ""]
        for name, c in rep["compare"].items():
            out.append(f"- `{name}`: 1 − cos {', '.join(_g(v) for v in c['one_minus_cos'])}; "
                       f"{int(sum(v or 0 for v in c['swaps']))} swaps; KLD {_g(c['kld'])}")
    out += ["", "## Top causes", "",
            "Share: integrated gradients of 1 − cos summed over layers (reference routing forced). Linear: the "
            "split of the linearised 1 − cos (J_g e_g by forward mode at m = 0). Only g low / all but g: "
            "real runs with free routing (last layer's 1 − cos, experts swapped over all layers).", "",
            "| group | what differs | share | linear | share of KLD | only g low: 1 − cos | swaps | "
            "all but g: 1 − cos | swaps |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in att["groups"][:TOP_GROUPS]:
        out.append(f"| {g['name']} | {g['cause']} | {_pct(g['share'])} | {_pct(g['linear_share'])} | "
                   f"{_pct(g['share_kld'])} | {_g(g['ablation']['omc'][-1])} | {int(sum(g['ablation']['swaps']))} | "
                   f"{_g(g['leave_one_out']['omc'][-1])} | {int(sum(g['leave_one_out']['swaps']))} |")
    out += ["", "By precision change:", ""]
    for c in att["causes"]:
        out.append(f"- {c['cause']}: {_pct(c['share'])} of 1 − cos, {_pct(c['share_kld'])} of KLD "
                   f"({', '.join(c['groups'][:6])}{', …' if len(c['groups']) > 6 else ''})")
    sw = att["swaps"]
    out += ["", "## Expert swaps: which groups moved the router margins", "",
            f"{sw['n_flipped']} changed top-k sets. The margin is the reference set's smallest router logit "
            "minus the largest outside it (> 0 while the set is the top-k); its change along the forced path is "
            "attributed by integrated gradients.", ""]
    if sw["n_flipped"]:
        movers = sorted(sw["top_mover_counts"].items(), key=lambda kv: -kv[1])
        out.append("Largest mover per flip: " + ", ".join(f"{k} {v}" for k, v in movers if v) + ".")
        out += ["", "| prompt | layer | token | margin ref | forced | low | top movers |", "|---:|---:|---:|---:|---:|---:|---|"]
        for f in sw["flips"][:TOP_SWAPS]:
            mv = ", ".join(f"{x['group']} {_g(x['move'])}" for x in f["movers"])
            out.append(f"| {f['prompt']} | {f['layer']} | {f['token']} | {_g(f['margin_ref'])} | "
                       f"{_g(f['margin_forced'])} | {_g(f['margin_low'])} | {mv} |")
    out += ["", "## Next-token distribution (llama-perplexity --kl-divergence statistics)", "",
            f"Over {lg['n_tokens']} positions, reference as the base model.", "",
            f"- Mean KLD: {lg['kld_mean']:.6f} ± {lg['kld_unc']:.6f}; maximum {lg['kld_max']:.6f}; "
            + "; ".join(f"{k}%: {v:.6f}" for k, v in lg["kld_percentiles"].items())
            + f"; minimum {lg['kld_min']:.6f}",
            f"- Mean Δp: {100 * lg['dp_mean']:.3f} ± {100 * lg['dp_unc']:.3f} %; RMS Δp: "
            f"{100 * lg['dp_rms']:.3f} ± {100 * lg['dp_rms_unc']:.3f} %",
            f"- Same top token: {100 * lg['same_top']:.3f} ± {100 * lg['same_top_unc']:.3f} %", ""]
    clo, rt = att["closure"], att["routing"]
    out += ["## Checks", "",
            f"- Closure (1 − cos summed over layers): change {_g(clo['omc_sum']['change'])}, attributed "
            f"{_g(clo['omc_sum']['attributed'])}, gap {_g(clo['omc_sum']['gap'])} ({_pct(clo['omc_sum']['rel_gap'])}); "
            f"KLD: change {_g(clo['kld']['change'])}, gap {_pct(clo['kld']['rel_gap'])}.",
            f"- Routing: KLD free {_g(rt['kld_free'])}, forced {_g(rt['kld_forced'])} "
            f"({_pct(rt['kld_share'])} from swaps); the forced replay swapped {rt['forced_swaps']} experts "
            "(0 by construction).",
            f"- Gradient of 1 − cos at m = 0 (quadratic there, never used for attribution): max "
            f"{_g(att['zero_gradient']['max_abs_omc'])}.", ""]
    return "\n".join(out)


def write(run_dir, rep: dict) -> dict:
    """Write report.json and report.md into run_dir; {name: path}."""
    run_dir = Path(run_dir)
    return {"report.json": atomic_write_json(run_dir / "report.json", rep),
            "report.md": atomic_write_text(run_dir / "report.md", markdown(rep))}


def load(path) -> dict:
    """report.json parsed back (numbers that were not finite are null)."""
    return json.loads(Path(path).read_text())
