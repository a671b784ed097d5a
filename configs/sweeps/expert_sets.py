"""Expert-set comparison at every layer: swaps, share of tokens whose top-k set changed, router cosine."""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("expert_sets", size, hypothesis="expert sets at every layer")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda", "ref": "ref-f64"}
    cfg.pairs = [["gpu", "cpu"], ["cpu", "ref"], ["gpu", "ref"], ["cuda", "ref"]]
    cfg.rule = "measured"
    return cfg
