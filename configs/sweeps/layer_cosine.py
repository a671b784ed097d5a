"""Per-layer cosine of a full forward, and the closing claim: does a per-matvec difference compound
into the per-layer drop, and how much of it do the routing flips carry?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("layer_cosine", size,
                            hypothesis="closing claim: a 2–3% per-matvec difference compounds across "
                                       "experts × layers",
                            reported="cos 0.94 at layers 7, 9, 12, 20, 23, 29, 46 (needs per-matvec 1−cos 7e-6 to "
                                     "grow to 6e-2)", their_verdict="claimed")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda", "ref": "ref-f64"}
    cfg.pairs = [["gpu", "cpu"], ["cpu", "ref"], ["gpu", "ref"], ["cuda", "ref"]]
    cfg.forced = [["cpu", "gpu"]]  # cpu's policy with gpu's expert choices
    cfg.rule = "compounding"
    return cfg
