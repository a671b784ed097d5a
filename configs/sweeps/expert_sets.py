"""Expert-set comparison at every layer: swaps, share of tokens whose top-k set changed, router cosine."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("expert_sets", "model_runs", size, chunk=4, hypothesis="expert sets at every layer")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda", "ref": "ref-f64"}
    cfg.pairs = [["gpu", "cpu"], ["cpu", "ref"], ["gpu", "ref"], ["cuda", "ref"]]
    cfg.capture = ["attn_q"]
    cfg.rule = "measured"
    return cfg
