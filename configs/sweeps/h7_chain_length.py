"""H7: does the difference compound along a chain of N Q6_K matvecs (L2-normalised between)?"""
from numlab.analysis.sweeps import base_config, compare_orders_with_q8_k


def get_config(size: str = "tiny"):
    cfg = base_config("h7_chain_length", "chain", size, chunk=2 if size == "tiny" else 1,
                      hypothesis="accumulator chain length",
                      reported="chain of N Q6_K matvecs with L2 normalisation, N = 1…48: rel diff flat, "
                               "6e-5 to 1e-4 (one 9.5e-4 at N = 16); cos = 1 to f32",
                      their_verdict="falsified")
    cfg.formats, cfg.rows, cfg.n_max = ["q6_k"], 0, 48  # rows 0: d_model of the size
    cfg.family, cfg.n_seeds, cfg.outlier_frac = "normal", 2 if size == "tiny" else 8, 0.01
    return compare_orders_with_q8_k(cfg)
