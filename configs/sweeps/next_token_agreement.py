"""Next-token agreement over many prompts: how often the CPU and GPU paths (and llama.cpp's CUDA
route) pick a different next token."""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("next_token_agreement", size, hypothesis="multi-prompt next-token agreement")
    cfg.n_prompts, cfg.n_tokens = (8, 8) if size == "tiny" else (64, 32)
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda"}
    cfg.pairs = [["gpu", "cpu"], ["cuda", "cpu"], ["cuda", "gpu"]]
    cfg.rule = "next_token"
    return cfg
