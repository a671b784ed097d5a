"""numlab.bench.plot and `scripts/bench.py plot`: each case's routed path and ratio to ggml from made-up
timings, the figure's file, and the command's errors on bad inputs; matvec and moe refusing a CPU."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from numlab.bench import matvec as mv, plot

ROOT = Path(__file__).resolve().parent.parent


def _timing(us, of_copy=0.5):
    return {"ok": True, "cold": {"device_us": us, "wall_us": 2 * us, "of_copy_bandwidth": of_copy}}


def _case(case, tuned_us, ref_us):
    """A sweep's result: the tuned config first, a faster variant after it (not what numlab.ops runs)."""
    variants = [] if tuned_us is None else [_timing(tuned_us, 0.7), _timing(tuned_us / 2, 0.9)]
    return {"case": dataclasses.asdict(case), "variants": variants, "best": variants[-1] if variants else None,
            "reference": {} if ref_us is None else _timing(ref_us, 0.1)}


ONE = mv.Case("q4_k", 4096, 14336, 1, "q8_1")
FLOAT_512 = mv.Case("q4_k", 4096, 14336, 512, "f32")
MOE_F32_256 = mv.Case("q4_k", 768, 2048, 256, "f32", what="mul_mat_id")
MOE_Q81_64 = mv.Case("q4_k", 768, 2048, 64, "q8_1", what="mul_mat_id")
NO_GGML = mv.Case("q6_k", 2048, 768, 1, "q8_1", what="mul_mat_id")


def test_routed_path_follows_tokens_per_matrix():
    assert [plot.routed_path(c) for c in (ONE, FLOAT_512, MOE_F32_256, MOE_Q81_64)] == ["kernel", "XLA", "XLA",
                                                                                       "kernel"]
    assert plot.routed_path(mv.Case("q4_k", 768, 2048, 64, "f32", what="mul_mat_id")) == "kernel"  # 4 per expert


def test_against_ggml_takes_the_routed_tuned_timing():
    results = [{"cases": [_case(ONE, 20.0, 100.0), _case(FLOAT_512, 9000.0, 1200.0), _case(NO_GGML, 10.0, 30.0)]},
               {"cases": [_case(MOE_F32_256, 2000.0, None), _case(MOE_Q81_64, 150.0, 7000.0)]}]
    rows, untimed = plot.against_ggml(results)
    assert untimed == [MOE_F32_256.name]
    assert [r["case"] for r in rows] == [ONE.name, FLOAT_512.name, MOE_Q81_64.name]
    assert [r["path"] for r in rows] == ["kernel", "XLA", "kernel"]
    assert [r["ours_us"] for r in rows] == [20.0, 1200.0, 150.0]
    assert [r["of_copy_bandwidth"] for r in rows] == [0.7, 0.1, 0.7]
    for r, case in zip(rows, (ONE, FLOAT_512, MOE_Q81_64)):
        assert r["ggml_over_ours"] == pytest.approx(mv.ggml_time_us(case) / r["ours_us"], rel=1e-12)


def test_figure_grows_with_the_cases(tmp_path):
    rows, _ = plot.against_ggml([{"cases": [_case(ONE, 20.0, 100.0), _case(FLOAT_512, 9000.0, 1200.0)]}])
    heights = []
    for n in (1, 2):
        path = plot.plot_against_ggml(rows[:n] * 3, tmp_path / f"f{n}.png", "t")
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        heights.append(matplotlib.image.imread(path).shape[0])
    assert heights[1] > heights[0]


def _bench(*args, command="plot"):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), command, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_plot_command(tmp_path):
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"device": "X", "jax_version": "0", "cases": [_case(ONE, 20.0, 100.0)]}))
    proc = _bench(f"--inputs={good}", f"--out={tmp_path / 'v.png'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    missing = tmp_path / "absent.json"
    proc = _bench(f"--inputs={missing}", f"--out={tmp_path / 'w.png'}")
    assert proc.returncode != 0 and str(missing) in proc.stderr
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"cases": [_case(NO_GGML, 10.0, 30.0)]}))
    proc = _bench(f"--inputs={none}", f"--out={tmp_path / 'w.png'}")
    assert proc.returncode != 0 and "no case with a ggml time" in proc.stderr
    assert not (tmp_path / "w.png").exists()


@pytest.mark.parametrize("command", ["matvec", "moe"])
def test_gpu_benchmarks_refuse_a_cpu(command, tmp_path):
    proc = _bench(f"--out={tmp_path / 'r.json'}", command=command)
    assert proc.returncode != 0
    assert f"{command} times the Pallas GPU kernels" in proc.stderr and "'cpu'" in proc.stderr
    assert not (tmp_path / "r.json").exists()
