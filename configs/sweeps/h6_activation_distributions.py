"""H6: does the activation distribution amplify the Q6_K matvec's CPU/GPU difference?"""
from numlab.analysis.sweeps import base_config, compare_orders_with_q8_k


def get_config(size: str = "tiny"):
    cfg = base_config("h6_activation_distributions", "matvec_grid", size, chunk=16,
                      hypothesis="activation distribution amplifies",
                      reported="rel diff 5.98e-7, 2.07e-6, 4.40e-7, 3.54e-7 for uniform, log-normal, 5× and "
                               "100× outliers (output L2 22.4, 10.4, 33.4, 584)",
                      their_verdict="falsified")
    cfg.weight, cfg.matrix, cfg.formats = "random", "ffn_down", ["q6_k"]
    cfg.families = ["uniform", "lognormal", "outlier5", "outlier100"]
    cfg.scales, cfg.n_seeds, cfg.outlier_frac = [1.0], 8, 0.01
    return compare_orders_with_q8_k(cfg)
