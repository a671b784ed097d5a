"""H0: is there a NaN on one path (per-layer diff, first non-finite site)?"""
from numlab.analysis.sweeps import model_runs_config


def get_config(size: str = "tiny"):
    cfg = model_runs_config("h0_nan", size, hypothesis="NaN on the GPU path",
                            reported="all 151936 logits NaN; layers 0–5 match (cos > 0.99986), first NaN at layer 6 "
                                     "MoE output", their_verdict="fixed separately")
    # cpu: ggml's CPU path (Q8_K activations); gpu: the engine's CUDA path (dequantize, f32 dot);
    # f16: every op in half precision, a policy that can overflow (shows the bisection at work).
    cfg.runs = {"cpu": "ggml-cpu", "gpu": "f32", "f16": "*.act=f16; *.dtype=f16"}
    cfg.pairs = [["gpu", "cpu"], ["f16", "cpu"]]
    cfg.rule = "nonfinite"
    return cfg
