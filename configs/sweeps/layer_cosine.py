"""Per-layer cosine of a full forward, and the closing claim: does a per-matvec difference compound
into the per-layer drop, and how much of it do the routing flips carry?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("layer_cosine", "model_runs", size, chunk=4,
                      hypothesis="closing claim: a 2–3% per-matvec difference compounds across experts × layers",
                      reported="cos 0.94 at layers 7, 9, 12, 20, 23, 29, 46 (needs per-matvec 1−cos 7e-6 to "
                               "grow to 6e-2)", their_verdict="claimed")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda", "ref": "ref-f64"}
    cfg.pairs = [["gpu", "cpu"], ["cpu", "ref"], ["gpu", "ref"], ["cuda", "ref"]]
    cfg.forced = [["cpu", "gpu"]]  # cpu's policy with gpu's expert choices
    cfg.capture = ["attn_q"]  # layer 0's attn_q sees identical inputs: the per-matvec difference
    cfg.rule = "compounding"
    return cfg
