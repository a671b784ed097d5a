"""H11: three-path bisection of one Q4_K matvec: fused Q8_K (CPU) vs dequantize + f32 (GPU) vs f64."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h11_three_path", "matvec_grid", size, chunk=16,
                      hypothesis="three-path bisection of Q4_K (A = CPU fused Q4_K×Q8_K, B = dequantize + "
                                 "f32 dot, C = exact)",
                      reported="A–B 2.88e-2 (1−cos 7.1e-6), A–C 2.88e-2, B–C 5.0e-7",
                      their_verdict="root cause: CPU quantizes activations to Q8_K, GPU keeps f32")
    cfg.weight, cfg.matrix, cfg.formats = "random", "attn_k", ["q4_k"]
    cfg.families, cfg.scales, cfg.n_seeds, cfg.outlier_frac = ["normal"], [1.0], 8, 0.01
    cfg.paths = ["q8_k", "f32", "q8_1"]
    cfg.ref = "f64"
    cfg.bisect = ["q8_k", "f32"]
    cfg.pairs = [["q8_1", "f32"]]
    cfg.metric = "max_rel"
    return cfg
