"""Test-wide settings: float64 on (tests decide, never library modules), hypothesis profile."""
import os
import sys

# Without this XLA may drop f32 -> bf16/f16 -> f32 rounding pairs inside fusions ("excess precision"),
# silently undoing the ops' low-precision emulation in larger (e.g. vmapped) graphs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # test processes share a GPU (determinism child)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("numlab", deadline=None, derandomize=True, max_examples=25, print_blob=True)
settings.load_profile("numlab")
