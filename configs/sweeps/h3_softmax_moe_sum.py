"""H3: does f64 for the router softmax and the experts' weighted sum change the divergence?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h3_softmax_moe_sum", "model_runs", size, chunk=4,
                      hypothesis="softmax / weighted-sum precision",
                      reported="fp64 gate softmax; f64 weighted sum: no change", their_verdict="falsified")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32",
                "gpu_f64_gate": "f32; *.router_softmax.dtype=f64; *.moe_sum.dtype=f64"}
    cfg.pairs = [["gpu", "cpu"], ["gpu_f64_gate", "cpu"]]
    cfg.capture = ["attn_q"]
    cfg.rule, cfg.cos_threshold = "layers", 0.99
    return cfg
