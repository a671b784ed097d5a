"""GGUF load/save of Qwen3-MoE models (byte-identical round trip, memory-mapped tensors, one clear
error per bad-file class) and the synthetic models (determinism, the Q4_K_M type mix)."""
import dataclasses
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from numlab.errors import GGUFError
from numlab.formats import QTensor
from numlab.models import config as C
from numlab.models import gguf_io, synthetic

MICRO = C.Qwen3MoeConfig(n_layers=2, d_model=256, n_heads=2, n_kv_heads=1, head_dim=128, n_experts=4,
                         n_experts_used=2, d_expert=256, vocab=256)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def micro():
    return synthetic.make_model(MICRO, seed=1)


def test_write_read_write_is_byte_identical_and_maps_the_file(micro, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    gguf_io.save_gguf(micro, a)
    loaded = gguf_io.load_gguf(a)
    gguf_io.save_gguf(loaded, b)
    assert a.read_bytes() == b.read_bytes()
    assert loaded.config == micro.config
    assert loaded.formats() == micro.formats()
    for name, t in micro.tensors.items():
        got = loaded.tensors[name]
        data, want = (got.data, t.data) if isinstance(t, QTensor) else (got, t)
        assert isinstance(data, np.ndarray) and not data.flags.owndata and not data.flags.writeable, name
        np.testing.assert_array_equal(data, np.asarray(want), err_msg=name)
    reader = gguf.GGUFReader(a)
    kv = {k: reader.get_field(k).contents() for k in reader.fields if k.startswith("qwen3moe.")}
    assert kv == {"qwen3moe.block_count": 2, "qwen3moe.context_length": 40960, "qwen3moe.embedding_length": 256,
                  "qwen3moe.expert_feed_forward_length": 256, "qwen3moe.attention.head_count": 2,
                  "qwen3moe.attention.head_count_kv": 1, "qwen3moe.attention.key_length": 128,
                  "qwen3moe.attention.value_length": 128, "qwen3moe.expert_count": 4,
                  "qwen3moe.expert_used_count": 2, "qwen3moe.rope.freq_base": 1e6,
                  "qwen3moe.attention.layer_norm_rms_epsilon": pytest.approx(1e-6, rel=1e-7)}
    types = {t.name: Q(t.tensor_type).name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.1.ffn_down_exps.weight"] == types["blk.1.attn_v.weight"] == "Q6_K"   # use_more_bits(1, 2)
    assert types["blk.0.ffn_down_exps.weight"] == types["blk.1.ffn_gate_exps.weight"] == "Q4_K"
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.attn_norm.weight"] == "F32"
    assert [int(d) for d in reader.tensors[[t.name for t in reader.tensors].index("blk.1.ffn_down_exps.weight")].shape] \
        == [256, 256, 4]                                         # ggml order: cols, rows, experts


def _raw(model):
    """{tensor name: (array, ggml type or None)} as GGUFWriter takes them."""
    out = {}
    for name, t in model.tensors.items():
        if isinstance(t, QTensor):
            out[name + ".weight"] = (np.asarray(t.data), Q(gguf_io.formats.spec(t.fmt).ggml_type))
        else:
            out[name + ".weight"] = (np.asarray(t), None)
    return out


def _write(path, tensors, metadata, arch="qwen3moe"):
    w = gguf.GGUFWriter(os.fspath(path), arch)
    for key, value in metadata.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    for name, (data, gtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _case(micro, tmp_path, *, arch="qwen3moe", drop_key=None, meta=None, tensors=None):
    raw = _raw(micro)
    for name, value in (tensors or {}).items():
        if value is None:
            del raw[name]
        else:
            raw[name] = value
    md = dict(C.to_gguf_metadata(micro.config), **(meta or {}))
    md.pop(drop_key, None)
    return _write(tmp_path / "bad.gguf", raw, md, arch)


@pytest.mark.parametrize("case, message", [
    (dict(arch="llama"), r"metadata 'general.architecture': is 'llama', expected 'qwen3moe'$"),
    (dict(drop_key="qwen3moe.expert_count"), r"metadata 'qwen3moe.expert_count': missing"),
    (dict(meta={"qwen3moe.attention.value_length": 64}),
     r"metadata 'qwen3moe.attention.value_length': is 64, expected the key length 128"),
    (dict(meta={"qwen3moe.attention.head_count_kv": 3}), r"metadata: n_kv_heads 3 must divide n_heads 2"),
    (dict(tensors={"blk.1.ffn_up_exps.weight": None}),
     r"tensor 'blk.1.ffn_up_exps.weight': missing \(expected shape \[4, 256, 256\]\)"),
    (dict(tensors={"blk.0.attn_q.weight": (np.zeros((128, 144), np.uint8), Q.Q4_K)}),
     r"tensor 'blk.0.attn_q.weight': shape \[128, 256\], expected \[256, 256\]"),
    (dict(tensors={"blk.0.ffn_norm.weight": (np.ones(256, np.float16), None)}),
     r"tensor 'blk.0.ffn_norm.weight': type f16, expected f32 \(norm weights\)"),
    (dict(tensors={"blk.0.attn_k.weight": (np.zeros((128, 8 * 22), np.uint8), Q.Q5_0)}),
     r"tensor 'blk.0.attn_k.weight': unsupported ggml type 6; supported: q4_k \(12\)"),
    (dict(tensors={"blk.0.attn_k.weight": (np.zeros((128, 292), np.uint8), Q.Q8_K)}),
     r"tensor 'blk.0.attn_k.weight': type q8_k is not a weight format; supported: q4_k, q5_k, q6_k, q8_0, f32"),
    (dict(tensors={"rope_freqs.weight": (np.ones(64, np.float32), None)}),
     r"tensor table: unexpected tensors \['rope_freqs.weight'\]"),
])
def test_bad_files_raise_one_clear_error(micro, tmp_path, case, message):
    path = _case(micro, tmp_path, **case)
    with pytest.raises(GGUFError, match=f"^{path}: " + message):
        gguf_io.load_gguf(path)


def test_synthetic_models_are_deterministic_per_seed(micro):
    again, other = synthetic.make_model(MICRO, seed=1), synthetic.make_model(MICRO, seed=2)
    for name, t in micro.tensors.items():
        data = lambda m: np.asarray(m.tensors[name].data if isinstance(t, QTensor) else m.tensors[name])  # noqa: E731
        np.testing.assert_array_equal(data(again), data(micro), err_msg=name)
        assert not np.array_equal(data(other), data(micro)), name


def test_q4_k_m_type_mix_of_the_full_size():
    cfg = C.CONFIGS["qwen3-30b-a3b"]
    q6 = [i for i in range(48) if synthetic.q4_k_m_format(f"blk.{i}.ffn_down_exps", cfg) == "q6_k"]
    assert q6 == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]
    assert all(synthetic.q4_k_m_format(f"blk.{i}.attn_v", cfg) == ("q6_k" if i in q6 else "q4_k") for i in range(48))
    fmt = {n: synthetic.q4_k_m_format(f"blk.7.{n}", cfg) for n in C.layer_tensor_shapes(cfg)}
    assert fmt == {"attn_norm": "f32", "attn_q": "q4_k", "attn_k": "q4_k", "attn_v": "q4_k", "attn_q_norm": "f32",
                   "attn_k_norm": "f32", "attn_output": "q4_k", "ffn_norm": "f32", "ffn_gate_inp": "f32",
                   "ffn_gate_exps": "q4_k", "ffn_up_exps": "q4_k", "ffn_down_exps": "q4_k"}
    assert synthetic.q4_k_m_format("output", cfg) == "q6_k" and synthetic.q4_k_m_format("token_embd", cfg) == "q4_k"


def test_synthetic_weights_are_heavy_tailed_and_formats_follow_the_mix(micro):
    assert micro.formats() == {n: synthetic.q4_k_m_format(n, MICRO) if len(s) > 1 else "f32"
                               for n, s in C.tensor_shapes(MICRO).items()}
    w = np.asarray(micro.tensors["blk.0.ffn_gate_exps"].dequantize(), np.float64).ravel()
    kurtosis = np.mean((w - w.mean()) ** 4) / np.var(w) ** 2
    assert kurtosis > 4                                          # a Gaussian has 3
    with pytest.raises(ValueError, match="token_embd has 128 columns; k-quant rows need a multiple of 256"):
        synthetic.make_model(dataclasses.replace(MICRO, d_model=128))
    with pytest.raises(ValueError, match="unknown model size 'huge'; valid sizes: tiny, small, qwen3-30b-a3b"):
        synthetic.make_model("huge")


def test_make_model_script_writes_a_loadable_file(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tiny.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "make_model.py"), "--size=tiny", "--seed=5",
                          f"--out={out}"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert gguf_io.load_gguf(out).config == C.CONFIGS["tiny"]
    assert "wrote" in run.stderr and "tiny, seed 5" in run.stderr
