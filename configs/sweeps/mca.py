"""Monte Carlo arithmetic on the model: every site of the f64 reference computes its op and perturbs its
output at a virtual precision of t bits; per layer, the residual stream's significant bits and the
probability that the top-k expert set changes."""
from numlab.analysis.sweeps import base_config


def get_config(size: str = "tiny"):
    cfg = base_config("mca", "mca_model", size, chunk=8 if size == "tiny" else 4,
                      hypothesis="how many bits of the residual stream survive, and how often routing flips, "
                                 "under random rounding at t bits (MCA)")
    cfg.ref = "ref-f64"
    cfg.sites = ["*"]  # every op; e.g. ["blk.*.ffn_*_exps"] for the expert matvecs only
    cfg.bits = [24, 8]  # float32-like and bfloat16-like output rounding
    cfg.n_samples = 16
    cfg.n_prompts, cfg.n_tokens = (1, 8) if size == "tiny" else (2, 16)
    return cfg
