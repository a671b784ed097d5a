"""Weight format × activation mode: each path's error against f64 for q4_k, q6_k and q8_0 weights."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("formats_acts", "matvec_grid", size, chunk=16,
                      hypothesis="which activation mode moves a quantized matvec, per weight format")
    cfg.weight, cfg.matrix, cfg.formats = "random", "ffn_down", ["q4_k", "q6_k", "q8_0"]
    cfg.families, cfg.scales, cfg.n_seeds, cfg.outlier_frac = ["normal", "outlier100"], [1.0], 8, 0.01
    cfg.paths = ["f32", "bf16", "f16", "q8_k", "q8_1", "q8_0"]
    cfg.ref = "f64"
    cfg.metric = "rel_l2"
    return cfg
