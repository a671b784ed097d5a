"""numlab.parallel: a batch sharded over 4 host devices (a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4) gives bit-identical numbers to one device, for a
per-token MoE step and for a sweep of analysis runs of a Qwen3-MoE; expert placement splits the
stacked expert weights over the devices without changing the forward pass."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numlab import ops
from numlab.formats import QTensor
from numlab.models import config as config_lib
from numlab.models.qwen3_moe import Model, forward
from numlab.models.sites import site_names
from numlab.parallel import place_experts, sharded, sharded_map

CHILD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import test_parallel as T
assert jax.device_count() == 4, jax.devices()
np.savez(sys.argv[2], **T.results(jax.devices()))
"""
D, E, K, N = 256, 8, 2, 37


def _weights():
    rng = np.random.default_rng(0)
    return {
        "norm": jnp.asarray(1 + 0.1 * rng.standard_normal(D), jnp.float32),
        "ffn_gate_inp": jnp.asarray(rng.standard_normal((E, D)), jnp.float32),
        "ffn_down_exps": QTensor.from_float(rng.standard_normal((E, 64, D)).astype(np.float32), "q4_k"),
    }


MODEL_CONFIG = config_lib.Qwen3MoeConfig(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64,
                                         n_experts=8, n_experts_used=2, d_expert=256, vocab=64)
MODEL_TOKENS = np.array([1, 5, 9, 3, 60, 2], np.int32)
LOW = "*.act=q8_0; *.ffn_gate_inp.act=f32"
_quantize = jax.jit(QTensor.from_float, static_argnums=1)


def _model():
    """A small Qwen3-MoE with random Q8_0 matrices and an f32 router."""
    rng = np.random.default_rng(2)
    tensors = {}
    for name, shape in config_lib.tensor_shapes(MODEL_CONFIG).items():
        if len(shape) == 1:
            tensors[name] = jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
        else:
            w = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-1]), jnp.float32)
            tensors[name] = _quantize(w, "f32" if name.endswith("gate_inp") else "q8_0")
    return Model(tensors=tensors, config=MODEL_CONFIG)


def _tokens():
    return np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)


def _token_fn(x, w):
    """One token through norm, router and the chosen experts (a per-example MoE step)."""
    h = ops.rmsnorm(x, w["norm"], 1e-6)
    logits = jnp.dot(w["ffn_gate_inp"], h, precision=jax.lax.Precision.HIGHEST)
    idx, weights, _ = ops.route(logits, K)
    experts = QTensor(w["ffn_down_exps"].data[idx], "q4_k", w["ffn_down_exps"].shape)
    y_q8 = ops.qmatvec(experts, h, act="q8_k")
    y_f64 = ops.qmatvec(experts, h.astype(jnp.float64), act="f64", acc="f64")
    return {"idx": idx, "moe": ops.moe_sum(y_q8, weights), "moe_f64": ops.moe_sum(y_f64, weights, dtype="f64"),
            "probs": ops.softmax(logits)}


def results(devices):
    """Everything the 1-device and 4-device runs must agree on, as a dict of numpy arrays."""
    w, x = _weights(), _tokens()
    out = {}
    for k, v in sharded_map(_token_fn, x, w, chunk=10, devices=devices).items():
        out[f"map_{k}"] = np.asarray(v)
    model = place_experts(_model(), devices=devices)
    up = model.tensors["blk.1.ffn_up_exps"].data
    out["model_shard_rows"] = np.array([s.data.shape[0] for s in up.addressable_shards])
    norm = model.tensors["blk.1.ffn_norm"]
    out["model_norm_shard_rows"] = np.array([s.data.shape[0] for s in norm.addressable_shards])
    trace = forward(model, MODEL_TOKENS, LOW)
    out["model_logits"], out["model_topk"] = np.asarray(trace.logits), np.asarray(trace.topk_idx)
    rows = np.eye(len(site_names(MODEL_CONFIG)))[:8]  # one-hot ablation rows of a sweep
    sweep = sharded_map(_ablation_row, rows, (model, MODEL_TOKENS), block=2, devices=devices)
    out["sweep_logits"] = np.asarray(sweep)
    return out


def _ablation_row(m, shared):
    """Last-token logits of an analysis run (LOW against f32) at mix m: one sweep point."""
    model, tokens = shared
    return forward(model, tokens, LOW, ref="f32", mix=m).logits[-1]


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """The 4-device process, started first so that it runs alongside this one's 1-device results."""
    path = tmp_path_factory.mktemp("parallel") / "four.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, os.path.dirname(__file__), str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def one_device(child):
    return results(jax.devices()[:1])


@pytest.fixture(scope="module")
def four_devices(child, one_device):
    proc, path = child
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_four_devices_bit_identical_to_one(four_devices, one_device):
    assert set(one_device) == set(four_devices)
    for k in one_device:
        if "shard_rows" not in k:
            np.testing.assert_array_equal(four_devices[k], one_device[k], err_msg=k)
    assert four_devices["map_moe"].shape == (N, 64)
    assert four_devices["map_moe_f64"].dtype == np.float64
    assert four_devices["sweep_logits"].shape == (8, MODEL_CONFIG.vocab)
    assert not np.array_equal(four_devices["sweep_logits"][0], four_devices["sweep_logits"][1])


def test_experts_split_over_four_devices(four_devices):
    np.testing.assert_array_equal(four_devices["model_shard_rows"], [MODEL_CONFIG.n_experts // 4] * 4)
    norm = four_devices["model_norm_shard_rows"]
    np.testing.assert_array_equal(norm, [MODEL_CONFIG.d_model] * 4)  # other tensors replicated


def test_sharded_map_equals_vmap_block_by_block():
    w, x = _weights(), _tokens()
    got = sharded_map(_token_fn, x, w, block=8)
    padded = np.concatenate([x, np.repeat(x[-1:], 40 - N, axis=0)])
    step = jax.jit(jax.vmap(_token_fn, in_axes=(0, None)))
    want = [step(jnp.asarray(padded[i:i + 8]), w) for i in range(0, 40, 8)]
    for k in got:
        np.testing.assert_array_equal(got[k], np.concatenate([np.asarray(b[k]) for b in want])[:N], err_msg=k)


def test_sharded_map_pytree_batch_and_chunks():
    batch = {"a": np.arange(23.0), "b": np.arange(46.0).reshape(23, 2)}
    out = sharded_map(lambda e, s: e["a"] * s + e["b"].sum(), batch, 2.0, block=4, chunk=5)
    np.testing.assert_array_equal(out, np.arange(23.0) * 2 + np.arange(46.0).reshape(23, 2).sum(1))


@pytest.mark.parametrize("kwargs,match", [({"block": 0}, "block"), ({"chunk": -1}, "chunk"),
                                          ({"block": 2.5}, "block")])
def test_sharded_map_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharded_map(lambda e, s: e, np.zeros(4), **kwargs)


def test_sharded_map_rejects_ragged_batch():
    with pytest.raises(ValueError, match="leading axis"):
        sharded_map(lambda e, s: e, {"a": np.zeros(4), "b": np.zeros(5)})


def test_place_experts_rejects_leaf_without_expert_axis():
    with pytest.raises(ValueError, match="ffn_up_exps"):
        place_experts({"ffn_up_exps": jnp.zeros((4, 4))})


def test_sharded_reuses_one_program_across_chunks():
    traces = []

    def fn(e, s):
        traces.append(1)
        return e * s
    apply = sharded(fn, block=4)
    a = apply(np.arange(10.0), 3.0)
    b = apply(np.arange(10.0, 20.0), 3.0)
    np.testing.assert_array_equal(np.concatenate([a, b]), np.arange(20.0) * 3)
    assert len(traces) == 1
