"""Monte Carlo arithmetic on the H7 chain: significant bits after each of N normalised matvecs when
every matvec output carries a random rounding error of a t-bit significand."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("mca_chain", "mca_chain", size, chunk=16,
                      hypothesis="does a chain of N matvecs lose significant bits (MCA)")
    cfg.rows, cfg.n_max, cfg.weight_format, cfg.family = 0, 48, "q6_k", "normal"  # rows 0: d_model
    cfg.bits = [24, 8]  # float32-like and bfloat16-like output rounding
    cfg.n_samples = 16 if size == "tiny" else 64
    return cfg
