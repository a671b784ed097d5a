"""H2: do the CPU and GPU paths route the last layer's tokens to different experts?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h2_last_layer_routing", "model_runs", size, chunk=4, hypothesis="layer 47 routing",
                      reported="router cos 0.9926; 2 of 8 experts swapped", their_verdict="confirmed")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32"}
    cfg.pairs = [["gpu", "cpu"]]
    cfg.capture = ["attn_q"]
    cfg.rule, cfg.layer = "routing", -1
    return cfg
