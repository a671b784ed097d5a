"""H2: do the CPU and GPU paths route the last layer's tokens to different experts?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("h2_last_layer_routing", size, hypothesis="layer 47 routing",
                            reported="router cos 0.9926; 2 of 8 experts swapped", their_verdict="confirmed")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32"}
    cfg.pairs = [["gpu", "cpu"]]
    cfg.rule, cfg.layer = "routing", -1
    return cfg
