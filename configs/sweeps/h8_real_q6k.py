"""H8: one matvec on the model's own Q6_K bytes (an ffn_down expert), reduction order vs activation mode."""
from numlab.analysis.sweeps import base_config, compare_orders_with_q8_k


def get_config(size: str = "tiny"):
    cfg = base_config("h8_real_q6k", "model_matvec", size, chunk=16, hypothesis="real Q6_K weights",
                      reported="one matvec on real layer bytes: rel diff 2.28e-7; note: the ffn_down of "
                               "layers 7, 9, 12 are Q4_K, not Q6_K", their_verdict="falsified")
    cfg.weight, cfg.weight_format, cfg.expert = "blk.*.ffn_down_exps", "q6_k", 0
    cfg.list_formats = "blk.*.ffn_down_exps"
    cfg.rows, cfg.cols = 0, 0  # the whole matrix
    cfg.families, cfg.scales, cfg.n_seeds, cfg.outlier_frac = ["normal"], [1.0], 8, 0.01
    return compare_orders_with_q8_k(cfg)
