"""H5: does the f32 reduction order inside one Q6_K matvec (CPU vs GPU) explain the divergence?"""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h5_q6k_reduction_order", "matvec_grid", size, chunk=16,
                      hypothesis="per-matvec Q6_K reduction order (synthetic weights)",
                      reported="one matvec, CPU vs GPU: rel diff ≈ 1e-7", their_verdict="falsified")
    cfg.weight, cfg.matrix, cfg.formats = "random", "ffn_down", ["q6_k"]
    cfg.families, cfg.scales, cfg.n_seeds, cfg.outlier_frac = ["normal"], [1.0], 16, 0.01
    cfg.paths = ["f32", "f32.order=pairwise", "f32.order=sequential", "f32.acc=f64", "q8_k", "q8_1"]
    cfg.ref = "f64"
    cfg.candidate = ["f32.order=sequential", "f32.order=pairwise"]  # the float orders CPU and GPU take
    cfg.baseline = ["q8_k", "f32"]  # the engine's CPU path (Q8_K activations) vs its GPU path (f32)
    cfg.metric = "rel_l2"
    return cfg
