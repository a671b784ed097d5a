"""H4: is the divergence user-visible: does the next token differ on a few prompts?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("h4_next_token", size, hypothesis="is it user-visible?",
                            reported="next-token argmax on 4 prompts: 3 of 4 agree; one prompt: CPU token 220, "
                                     "GPU token 25", their_verdict="not benign")
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32"}
    cfg.pairs = [["gpu", "cpu"]]
    cfg.rule = "next_token"
    return cfg
