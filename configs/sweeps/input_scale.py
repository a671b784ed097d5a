"""Input scale: each path's error against f64 as the activations scale from 1e-6 to 1e4 (Q8_1 keeps
its block scale in fp16, which underflows and overflows)."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("input_scale", "matvec_grid", size, chunk=16,
                      hypothesis="does the activations' scale change the matvec paths' error")
    cfg.weight, cfg.matrix, cfg.formats = "random", "ffn_down", ["q4_k"]
    cfg.families, cfg.n_seeds, cfg.outlier_frac = ["normal"], 4, 0.01
    cfg.scales = [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4]
    cfg.paths = ["f32", "bf16", "q8_k", "q8_1"]
    cfg.ref = "f64"
    cfg.metric = "rel_l2"
    return cfg
