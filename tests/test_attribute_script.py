"""scripts/attribute.py end to end on its embedded default (tiny synthetic model written to GGUF and
loaded back, ggml-cpu against f32): the run folder, report.json parsing back, report.md, the plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from numlab.analysis import plots, report
from numlab.models.gguf_io import save_gguf
from numlab.models.synthetic import make_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "attribute.py"


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "run"
    proc = _run(f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_default_run_writes_everything(default_run):
    out, proc = default_run
    names = {p.name for p in out.iterdir()}
    assert names == {"report.json", "report.md", *plots.PLOTS}, names
    for name in plots.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "wrote" in proc.stdout and "leading cause" in proc.stdout


def test_report_parses_back_and_holds_the_numbers(default_run):
    out, _ = default_run
    rep = report.load(out / "report.json")
    meta, h, att = rep["meta"], rep["headline"], rep["attribution"]
    assert meta["low_name"] == "ggml-cpu" and meta["ref_name"] == "f32" and meta["by"] == "kind"
    assert meta["n_prompts"] == 4 and "random token ids" in meta["prompts"]
    n_layers = meta["n_layers"]
    # the numbers say matvec activation quantization leads (the only difference of the two presets
    # that carries an error; every other group is "same precision" with a share near zero)
    assert h["leading_cause"]["cause"] == "matvec act f32→q8_k"
    assert h["leading_cause"]["share"] > 0.99
    lead = [g for g in att["groups"] if g["cause"] == "matvec act f32→q8_k"]
    assert {g["name"] for g in lead} >= {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps",
                                         "ffn_up_exps", "ffn_down_exps", "output"}
    assert att["groups"][0]["name"] == h["leading_group"]
    shares = [g["share"] for g in att["groups"]]
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) - 1) < 1e-9
    for g in att["groups"]:
        assert len(g["ig_omc"]) == n_layers and len(g["ablation"]["omc"]) == n_layers
    # per-layer numbers are consistent with each other
    lay = rep["layers"]
    omc = np.array(lay["one_minus_cos"])
    assert np.all(omc > 0) and np.all(np.array(lay["cos_mean"]) < 1)
    np.testing.assert_allclose(omc, att["routing"]["omc_free"], rtol=1e-6)
    np.testing.assert_allclose(np.array(lay["routing"]) + lay["forced_one_minus_cos"], omc, rtol=1e-9)
    assert sum(lay["swaps"]) == h["swaps"] and h["changed_choices"] <= h["swaps"]
    assert h["choices"] == meta["n_prompts"] * meta["n_tokens"] * n_layers
    assert np.array(rep["tokens"]["swaps"]).sum() == h["swaps"]
    assert att["closure"]["omc_sum"]["rel_gap"] < 0.1
    assert rep["logits"]["n_tokens"] == meta["n_prompts"] * (meta["n_tokens"] - 1)
    assert len(rep["logits"]["next_token"]) == meta["n_prompts"]
    # the Markdown is a view of the JSON: rebuilt from the parsed file it is the same text
    md = (out / "report.md").read_text()
    assert report.markdown(rep) == md
    assert md.startswith("# Divergence of `ggml-cpu` from `f32`")
    assert "**Leading cause: matvec act f32→q8_k** (matvec: activations quantized to q8_k (reference f32))" in md


def test_refuses_to_overwrite_and_rejects_bad_flags(default_run, tmp_path):
    out, _ = default_run
    proc = _run(f"--out={out}", timeout=120)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    proc = _run(f"--out={tmp_path / 'x'}", "--low=ggml-gpu", timeout=120)
    assert proc.returncode != 0 and "ggml-cpu" in proc.stderr and "ggml-gpu" in proc.stderr
    proc = _run(f"--out={tmp_path / 'y'}", "--groups=op", timeout=120)
    assert proc.returncode != 0 and "kind" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_find_nonfinite_names_the_planted_site(tmp_path):
    """A NaN written into one layer's ffn_norm weight: --find_nonfinite reports that site for both
    policies and stops before the analysis."""
    model = make_model("tiny")
    tensors = dict(model.tensors)
    tensors["blk.2.ffn_norm"] = jnp.asarray(tensors["blk.2.ffn_norm"]).at[3].set(jnp.nan)
    path = tmp_path / "nan.gguf"
    save_gguf(type(model)(tensors=tensors, config=model.config), path)
    out = tmp_path / "run"
    proc = _run(f"--model={path}", f"--out={out}", "--find_nonfinite", "--config.n_prompts=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    hits = json.loads((out / "nonfinite.json").read_text())
    for label in ("low", "ref"):
        assert hits[label]["site"] == "blk.2.ffn_norm" and hits[label]["layer"] == 2, hits
    assert not (out / "report.json").exists()


def test_out_of_device_memory_retries_with_fewer_mix_rows(monkeypatch):
    import importlib.util
    import jax
    import ml_collections
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("attribute_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = make_model("tiny")
    n_rows = 2 + 2 * len(script.attribution.group_sites(tuple(script.site_kinds(model.config)), "kind").names)
    tried = []

    def fake_analyze(model, tokens, low, ref, *, batch_size, **kw):
        tried.append(batch_size)
        if batch_size > 5:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 41.14GiB")
        return "result"

    monkeypatch.setattr(script.attribution, "analyze", fake_analyze)
    c = ml_collections.ConfigDict(dict(low="ggml-cpu", ref="f32", groups="kind", ig_points=8, rule="gauss",
                                       batch_size=0))
    want = [n_rows]                                        # all rows in one call, then halves down to 5
    while want[-1] > 5:
        want.append(want[-1] // 2)
    assert script.analyze_fitting(model, None, c, None) == ("result", want[-1])
    assert tried == want and len(want) >= 3
    c.batch_size, tried[:] = 2, []
    monkeypatch.setattr(script.attribution, "analyze", lambda *a, batch_size, **k: fake_analyze(
        *a, batch_size=batch_size + 10, **k))              # out of memory even at 2 rows: nothing smaller
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        script.analyze_fitting(model, None, c, None)
    assert tried == [12]
