"""H4: is the divergence user-visible: does the next token differ on a few prompts?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h4_next_token", "model_runs", size, chunk=4, hypothesis="is it user-visible?",
                      reported="next-token argmax on 4 prompts: 3 of 4 agree; one prompt: CPU token 220, "
                               "GPU token 25", their_verdict="not benign")
    cfg.n_prompts, cfg.n_tokens = 4, 8 if size == "tiny" else 32
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32"}
    cfg.pairs = [["gpu", "cpu"]]
    cfg.capture = ["attn_q"]
    cfg.rule = "next_token"
    return cfg
