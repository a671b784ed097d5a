"""H10: a Q4_K matvec on a slice of layer 0's attn_k: CPU path (Q8_K activations) against the GPU path
(f32), and each against the exact product, to see which one is off."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("h10_q4k_real_slice", "model_matvec", size, chunk=16,
                      hypothesis="Q4_K matvec on real weights",
                      reported="CPU as truth vs GPU, 16×512 slice of layer 0 attn_k: cos 0.999994, "
                               "max rel 5.47e-2", their_verdict="blamed CUDA (wrong)")
    cfg.weight, cfg.weight_format, cfg.expert, cfg.list_formats = "blk.0.attn_k", "", 0, ""
    cfg.rows, cfg.cols = 16, 512
    cfg.families, cfg.scales, cfg.n_seeds, cfg.outlier_frac = ["normal"], [1.0], 8, 0.01
    cfg.paths = ["q8_k", "f32", "q8_1"]
    cfg.ref = "f64"
    cfg.bisect = ["q8_k", "f32"]
    cfg.metric = "max_rel"
    return cfg
