"""Process settings every numlab script makes before JAX starts: `import xla_env` comes first.

XLA must not drop f32 -> bf16/f16 -> f32 rounding pairs ("excess precision"): that would silently undo
the low-precision ops being analysed. A script is the only job on its GPU, and the full-size model
(18.6 GB of weights) plus a batch of runs needs more than JAX's default 75% of the device's memory.
"""
import os

if "--xla_allow_excess_precision=false" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
