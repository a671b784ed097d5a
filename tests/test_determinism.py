"""Same inputs and policy, same bytes: a forward pass, an attribution gradient and quantization give
bit-identical results run twice, after recompiling, and in a second process (CPU)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numlab.formats as formats
from numlab.models.config import Qwen3MoeConfig
from numlab.models.gguf_io import load_gguf, save_gguf
from numlab.models.qwen3_moe import forward
from numlab.models.sites import site_names
from numlab.models.synthetic import make_model

CONFIG = Qwen3MoeConfig(n_layers=1, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                        n_experts_used=2, d_expert=256, vocab=64)
TOKENS = np.array([3, 17, 42, 8, 8, 60, 1], np.int32)
CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import test_determinism as T
np.savez(sys.argv[3], **T.compute(sys.argv[2]))
"""


@jax.jit
def _attribution(model, mix):
    """d/d mix of a fixed linear read-out of the logits, for an analysis run ggml-cpu vs f32."""
    def metric(m):
        logits = forward(model, TOKENS, "ggml-cpu", ref="f32", mix=m).logits
        return jnp.sum(logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape)))
    return jax.value_and_grad(metric)(mix)


_quantize = jax.jit(formats.quantize, static_argnums=1)


def compute(path) -> dict:
    """Every number the determinism tests compare, from the model file at path."""
    model = load_gguf(path)
    trace = forward(model, TOKENS, "ggml-cpu")
    value, grad = _attribution(model, jnp.full(len(site_names(CONFIG)), 0.5))
    x = np.random.default_rng(7).standard_normal((16, 512)).astype(np.float32)
    x *= np.geomspace(1e-3, 1e3, 16, dtype=np.float32)[:, None]
    out = {"logits": trace.logits, "resid": trace.resid, "router_logits": trace.router_logits,
           "topk_idx": trace.topk_idx, "value": value, "grad": grad}
    out.update({f"quant_{fmt}": _quantize(jnp.asarray(x), fmt) for fmt in ("q4_k", "q8_k")})
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "micro.gguf"
    save_gguf(make_model(CONFIG, seed=3), path)
    return str(path)


@pytest.fixture(scope="module")
def child(model_file):
    """A second process computing the same numbers, started first so that it runs alongside this one."""
    out = model_file + ".child.npz"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # On a GPU both processes share the device: neither may preallocate most of its memory.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), model_file,
                             out], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def first(model_file, child):
    return compute(model_file)


def _assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs in {np.sum(a[k] != b[k])} elements"


def test_results_are_real(first):
    assert np.isfinite(first["logits"]).all() and first["logits"].shape == (len(TOKENS), CONFIG.vocab)
    assert first["grad"].shape == (len(site_names(CONFIG)),) and np.count_nonzero(first["grad"]) >= 4
    assert first["quant_q4_k"].dtype == np.uint8 and first["quant_q4_k"].shape == (16, 2 * 144)


def test_twice_in_one_process(model_file, first):
    _assert_bit_identical(first, compute(model_file))


def test_in_a_second_process(first, child):
    proc, out = child
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    with np.load(out) as z:
        _assert_bit_identical(first, {k: z[k] for k in z.files})
