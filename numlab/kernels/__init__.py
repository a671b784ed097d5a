"""Fast GPU paths (Pallas with the Triton lowering) behind the signatures of numlab.ops.

qmatvec_fast(w, x, act, acc): quantized matrix-vector products, numerically numlab.ops.qmatvec to
float rounding; expert_qmatvec_fast: a MoE layer's expert products with tokens grouped by expert
(numlab.ops.expert_qmatvec). `mode()` (NUMLAB_KERNELS) and `use_for` decide whether numlab.ops routes a
product here: on a GPU where a kernel applies and pays (`enabled`, `applies`, `tuning.pays`).
"""
from numlab.kernels.moe import expert_qmatvec_fast
from numlab.kernels.qmatmul import Config, acts_for
from numlab.kernels.qmatvec import MODES, applies, enabled, mode, qmatvec_fast, use_for

__all__ = ["Config", "MODES", "acts_for", "applies", "enabled", "expert_qmatvec_fast", "mode", "qmatvec_fast",
           "use_for"]
