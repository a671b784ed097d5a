"""Test-wide settings: float64 on (tests decide, never library modules), hypothesis profile."""
import os
import sys

import jax
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("numlab", deadline=None, derandomize=True, max_examples=25, print_blob=True)
settings.load_profile("numlab")
