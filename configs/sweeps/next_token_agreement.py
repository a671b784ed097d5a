"""Next-token agreement over many prompts: how often the CPU and GPU paths (and llama.cpp's CUDA
route) pick a different next token."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("next_token_agreement", "model_runs", size, chunk=4,
                      hypothesis="multi-prompt next-token agreement")
    cfg.n_prompts, cfg.n_tokens = (8, 8) if size == "tiny" else (64, 32)
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "cuda": "ggml-cuda"}
    cfg.pairs = [["gpu", "cpu"], ["cuda", "cpu"], ["cuda", "gpu"]]
    cfg.capture = ["attn_q"]
    cfg.rule = "next_token"
    return cfg
