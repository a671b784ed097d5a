"""H1: do f64 accumulators in the GPU path's Q6_K matvecs bring its layers closer to the CPU path?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h1_q6k_accumulation", "model_runs", size, chunk=4,
                      hypothesis="f32 accumulation order inside the Q6_K matvec",
                      reported="fp64 accumulators in the GPU Q6_K matvec: 47 of 48 layers reach cos ≥ 0.99; "
                               "layer 47 at cos 0.961", their_verdict="partial")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "gpu_acc64": "f32; @q6_k.acc=f64"}
    cfg.pairs = [["gpu", "cpu"], ["gpu_acc64", "cpu"]]
    cfg.capture = ["attn_q"]
    cfg.rule, cfg.cos_threshold = "layers", 0.99
    return cfg
