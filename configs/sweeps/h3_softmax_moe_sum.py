"""H3: does f64 for the router softmax and the experts' weighted sum change the divergence?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("h3_softmax_moe_sum", size, hypothesis="softmax / weighted-sum precision",
                            reported="fp64 gate softmax; f64 weighted sum: no change", their_verdict="falsified")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32",
                "gpu_f64_gate": "f32; *.router_softmax.dtype=f64; *.moe_sum.dtype=f64"}
    cfg.pairs = [["gpu", "cpu"], ["gpu_f64_gate", "cpu"]]
    cfg.rule, cfg.cos_threshold = "layers", 0.99
    return cfg
