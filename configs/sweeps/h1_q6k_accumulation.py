"""H1: do f64 accumulators in the GPU path's Q6_K matvecs bring its layers closer to the CPU path?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("h1_q6k_accumulation", size,
                            hypothesis="f32 accumulation order inside the Q6_K matvec",
                            reported="fp64 accumulators in the GPU Q6_K matvec: 47 of 48 layers reach cos ≥ 0.99; "
                                     "layer 47 at cos 0.961", their_verdict="partial")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "gpu_acc64": "f32; @q6_k.acc=f64"}
    cfg.pairs = [["gpu", "cpu"], ["gpu_acc64", "cpu"]]
    cfg.rule, cfg.cos_threshold = "layers", 0.99
    return cfg
