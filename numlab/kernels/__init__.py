"""Fast GPU paths (Pallas with the Triton lowering) behind the signatures of numlab.ops.

qmatvec_fast(w, x, act, acc): quantized matrix-vector products, numerically numlab.ops.qmatvec to
float rounding; moe_ffn: a MoE layer's experts with tokens grouped by expert. `enabled()` says whether
they run natively here (GPU); `applies(w, act, acc)` whether a kernel covers the case.
"""
from numlab.kernels.qmatmul import Config, acts_for
from numlab.kernels.qmatvec import applies, enabled, qmatvec_fast

__all__ = ["Config", "acts_for", "applies", "enabled", "qmatvec_fast"]
