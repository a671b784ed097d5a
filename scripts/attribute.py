"""Main job: run a model under two precision policies, measure where they diverge and attribute the
divergence to op groups; writes report.json, report.md and PNG plots into a run folder.

    python scripts/attribute.py                      # embedded default (configs/attribute.py)
    python scripts/attribute.py --model=m.gguf --low=ggml-cuda --ref=f32 --groups=layer --out=results/x

With no --model the synthetic model of --config.size is written to a GGUF file in a temporary folder
and loaded back. Prompts are random token ids (numpy default_rng(--config.prompt_seed)), not text.
"""
import os
import tempfile
import time
from pathlib import Path

import xla_env  # noqa: F401  (before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from numlab import policy as policy_lib  # noqa: E402
from numlab.analysis import attribution, plots, report  # noqa: E402
from numlab.analysis.nonfinite import nonfinite_report  # noqa: E402
from numlab.io import atomic_write_json, make_run_dir  # noqa: E402
from numlab.models import config as config_lib  # noqa: E402
from numlab.models.gguf_io import load_gguf  # noqa: E402
from numlab.models.sites import site_kinds  # noqa: E402
from numlab.models.synthetic import write as write_synthetic  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent.parent / "configs" / "attribute.py"),
    "experiment config (ml_collections); fields can be set as --config.<field>=value")
FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file to analyse (default: the config's synthetic model)")
flags.DEFINE_string("low", None, "policy under test: preset name or rules GLOB.field=value; ...")
flags.DEFINE_string("ref", None, "reference policy")
flags.DEFINE_string("out", None, "run folder (default results/attribute-<model>-<low>-vs-<ref>)")
flags.DEFINE_bool("overwrite", False, "replace the results in an existing run folder")
flags.DEFINE_integer("ig_points", None, "quadrature nodes of the integrated gradients")
flags.DEFINE_bool("find_nonfinite", False, "first find the first site (layer, op, token) that makes a NaN/Inf "
                  "under --low and under --ref (nonfinite.json); stop there if any does")
flags.DEFINE_enum("groups", None, list(attribution.GROUPINGS), "group the sites by op kind, by layer, or not")


def _settings():
    """The config with the explicit flags applied, validated."""
    c = _CONFIG.value
    for name in ("model", "low", "ref", "out", "ig_points", "groups"):
        if getattr(FLAGS, name) is not None:
            c[name] = getattr(FLAGS, name)
    if c.groups not in attribution.GROUPINGS:
        raise app.UsageError(f"groups {c.groups!r}: valid: {', '.join(attribution.GROUPINGS)}")
    if c.rule not in attribution.RULES:
        raise app.UsageError(f"rule {c.rule!r}: valid: {', '.join(attribution.RULES)}")
    if c.ig_points < 1 or c.n_prompts < 1 or c.n_tokens < 2 or c.batch_size < 0:
        raise app.UsageError(f"need ig_points >= 1, n_prompts >= 1, n_tokens >= 2, batch_size >= 0; got "
                             f"{c.ig_points}, {c.n_prompts}, {c.n_tokens}, {c.batch_size}")
    if c.model and not os.path.isfile(c.model):
        raise app.UsageError(f"--model {c.model!r} is not a file")
    for name in ("low", "ref"):
        try:
            policy_lib.get(c[name])
        except ValueError as e:
            raise app.UsageError(f"--{name}: {e}") from e
    return c


def analyze_fitting(model, tokens, c, progress):
    """(attribution.analyze result, mix rows per compiled call used): c.batch_size rows (0: all); after
    running out of device memory, again with half as many, down to 2, saying so each time."""
    n_rows = 2 + 2 * len(attribution.group_sites(tuple(site_kinds(model.config)), c.groups).names)
    size = c.batch_size or n_rows
    while True:
        try:
            res = attribution.analyze(model, tokens, c.low, c.ref, by=c.groups, ig_points=c.ig_points, rule=c.rule,
                                      batch_size=size, progress=progress)
            return res, size
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or size <= 2:
                raise
            logging.warning("out of device memory with %d mix rows per compiled call; retrying with %d "
                            "(set --config.batch_size to start there)", size, max(2, size // 2))
            size = max(2, size // 2)


def _load(c):
    """(model, description): the GGUF file, or the synthetic model written to GGUF and loaded back."""
    if c.model:
        return load_gguf(c.model), os.path.basename(c.model)
    config_lib.get(c.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"synthetic-{c.size}.gguf"
        write_synthetic(c.size, path, seed=c.seed)
        size = path.stat().st_size
        model = load_gguf(path)
        model = jax.tree.map(lambda a: jax.numpy.asarray(a), model)   # off the memory map before it goes
    return model, f"synthetic {c.size} (seed {c.seed}, Q4_K_M, {size / 2**20:.1f} MiB GGUF, written and loaded back)"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    jax.config.update("jax_enable_x64", True)
    c = _settings()
    tag = Path(c.model).stem if c.model else c.size
    name = lambda p: p if p in policy_lib.PRESETS else "custom"  # noqa: E731
    out = Path(c.out or f"results/attribute-{tag}-{name(c.low)}-vs-{name(c.ref)}")
    run_dir = make_run_dir(out.parent, out.name, overwrite=FLAGS.overwrite)
    timings, t0 = {}, time.perf_counter()
    bar = lambda it, **kw: tqdm(it, **kw)  # noqa: E731

    logging.info("loading the model")
    model, desc = _load(c)
    timings["model_s"] = time.perf_counter() - t0
    tokens = np.random.default_rng(c.prompt_seed).integers(0, model.config.vocab, (c.n_prompts, c.n_tokens))
    if FLAGS.find_nonfinite:
        hits = nonfinite_report(model, tokens, {"low": c.low, "ref": c.ref})
        path = atomic_write_json(run_dir / "nonfinite.json", hits)
        for label, hit in hits.items():
            where = ("none" if hit is None else
                     f"{hit['site']} (layer {hit['layer']}, token {hit['token']}, prompt {hit['prompt']})")
            print(f"first non-finite under --{label} ({c[label]}): {where}")
        print(f"wrote {path}")
        if any(hits.values()):
            return
    logging.info("analysing %s against %s on %s (%s), %d prompts × %d tokens", c.low, c.ref, desc,
                 jax.default_backend(), c.n_prompts, c.n_tokens)
    t1 = time.perf_counter()
    res, c.batch_size = analyze_fitting(model, tokens, c, bar)
    timings["analyze_s"] = time.perf_counter() - t1
    res["compare"] = {}
    for p in [p.strip() for p in c.compare.split(",") if p.strip()]:
        logging.info("comparing policy %s", p)
        res["compare"][p] = attribution.policy_divergence(model, tokens, p, c.ref)
    timings["total_s"] = time.perf_counter() - t0
    meta = dict(model=desc, low_name=c.low, ref_name=c.ref, device=jax.default_backend(),
                prompts=f"random token ids, numpy default_rng({c.prompt_seed})", timings=timings,
                config=c.to_dict())
    rep = report.build(res, meta)
    paths = {**report.write(run_dir, rep), **plots.write_all(run_dir, rep)}
    h = rep["headline"]
    lc = h["leading_cause"]
    print(f"{c.low} vs {c.ref} on {desc}: worst layer {h['worst_layer']} mean cos {h['worst_layer_cos']:.6f}; "
          f"leading cause {lc['cause'] if lc else 'none'} ({100 * (lc['share'] or 0):.1f}%); "
          f"{h['changed_choices']}/{h['choices']} expert sets changed; "
          f"next token agrees {h['next_token_agree']}/{h['n_prompts']}; {timings['total_s']:.1f} s")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    app.run(main)
