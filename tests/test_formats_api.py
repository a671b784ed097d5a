"""Format registry (spec, errors), the QTensor pytree, and the plain float formats f32/f16/bf16."""
import chex
import ggml_oracle
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp

import numlab.formats as formats
from numlab.formats import QTensor

Q8 = ("q8_0", "q8_1", "q8_k")
SPECIAL = np.array([1.0, -2.5, 3.14159, 1e-40, 65504, 65520, 70000, 1e38, 3.3895314e38,
                    np.inf, -np.inf, np.nan, -0.0, 0.0, 5.96e-8, 2.98e-8], np.float32)


@pytest.mark.parametrize("fmt,n,bs", [("q8_0", 100, 32), ("q8_1", 48, 32), ("q8_k", 300, 256)])
def test_length_not_multiple_names_both_numbers(fmt, n, bs):
    with pytest.raises(ValueError, match=rf"\b{n}\b.*\b{bs}\b"):
        formats.quantize(np.zeros((2, n), np.float32), fmt)
    with pytest.raises(ValueError, match=rf"\b{n}\b.*\b{bs}\b"):
        formats.row_bytes(fmt, n)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_quantize_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        formats.quantize(np.zeros((2, 32), dtype), "q8_0")


def test_dequantize_wrong_dtype_and_size():
    with pytest.raises(TypeError, match="int8"):
        formats.dequantize(np.zeros((2, 34), np.int8), "q8_0")
    with pytest.raises(ValueError, match=r"\b35\b.*\b34\b"):
        formats.dequantize(np.zeros((2, 35), np.uint8), "q8_0")


def test_scalar_rank_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        formats.quantize(np.float32(1.0), "q8_0")
    with pytest.raises(ValueError, match="rank"):
        formats.dequantize(np.uint8(1), "q8_0")


@pytest.mark.parametrize("call", [lambda f: formats.spec(f), lambda f: formats.row_bytes(f, 256),
                                  lambda f: formats.quantize(np.zeros(256, np.float32), f),
                                  lambda f: formats.dequantize(np.zeros(34, np.uint8), f)])
def test_unknown_format_lists_valid_ones(call):
    with pytest.raises(ValueError, match="q4_0") as e:
        call("q4_0")
    for f in formats.FORMATS:
        assert f in str(e.value)


@pytest.mark.parametrize("fmt", Q8 + ("f32", "f16"))
def test_spec_matches_ggml(fmt):
    s = formats.spec(fmt)
    assert s.ggml_type == ggml_oracle.TYPES[fmt]
    assert formats.row_bytes(fmt, 1024) == ggml_oracle.row_bytes(fmt, 1024)
    assert s.type_size * 1024 // s.block_size == ggml_oracle.row_bytes(fmt, 1024)
    assert formats.fmt_of_ggml_type(s.ggml_type) == fmt


def test_unknown_ggml_type():
    with pytest.raises(ValueError, match=r"\b2\b.*q8_0 \(8\)"):
        formats.fmt_of_ggml_type(2)  # Q4_0


def test_float_formats_have_no_codec():
    with pytest.raises(ValueError, match="f16"):
        formats.codec("f16")


@pytest.mark.parametrize("fmt", Q8)
def test_unpack_codes_and_scales(fmt):
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    raw = formats.quantize(x, fmt)
    u = formats.unpack(raw, fmt)
    s = formats.spec(fmt)
    nb = 512 // s.block_size
    chex.assert_shape(u.q, (3, nb, s.block_size))
    chex.assert_shape(u.d, (3, nb))
    assert u.q.dtype == jnp.int32 and u.d.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(u.q * u.d[..., None]).reshape(3, 512),
                                  np.asarray(formats.dequantize(raw, fmt)))


class TestQTensor:

    def test_pytree_flatten_unflatten(self):
        w = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
        t = QTensor.from_float(w, "q8_k")
        leaves, treedef = jax.tree_util.tree_flatten(t)
        assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8
        chex.assert_shape(leaves[0], (4, 292))
        back = jax.tree_util.tree_unflatten(treedef, leaves)
        assert (back.fmt, back.shape) == ("q8_k", (4, 256))
        np.testing.assert_array_equal(np.asarray(back.data), np.asarray(t.data))

    def test_jit_through_and_dequantize(self):
        w = np.random.default_rng(2).standard_normal((2, 8, 64)).astype(np.float32)
        t = QTensor.from_float(w, "q8_0")
        assert t.shape == (8, 64) and t.nbytes == 2 * 8 * 68
        want = np.asarray(formats.dequantize(formats.quantize(w, "q8_0"), "q8_0"))
        np.testing.assert_array_equal(np.asarray(t.dequantize()), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(QTensor.dequantize)(t)), want)
        same = jax.jit(lambda q: q)(t)
        assert isinstance(same, QTensor) and (same.fmt, same.shape) == ("q8_0", (8, 64))
        chex.assert_trees_all_equal(same, t)

    def test_from_bytes_checks_size(self):
        raw = formats.quantize(np.zeros((4, 64), np.float32), "q8_1")
        t = QTensor.from_bytes(raw, "q8_1", (4, 64))
        assert t.shape == (4, 64)
        with pytest.raises(ValueError, match=r"\(4, 72\).*\(4, 108\)"):
            QTensor.from_bytes(raw, "q8_1", (4, 96))
        with pytest.raises(ValueError, match=r"\b60\b.*\b32\b"):
            QTensor.from_bytes(raw, "q8_1", (4, 60))
        with pytest.raises(ValueError, match=r"\(4, 72\).*\(5, 72\)"):
            QTensor.from_bytes(raw, "q8_1", (5, 64))


@pytest.mark.parametrize("fmt,np_dtype", [("f32", np.float32), ("f16", np.float16)])
def test_float_bytes_match_numpy_and_ggml(fmt, np_dtype):
    x = SPECIAL[None, :]
    with np.errstate(over="ignore"):  # the f16 overflow to Inf is wanted
        want = x.astype(np_dtype)
    raw = np.asarray(formats.quantize(x, fmt))
    np.testing.assert_array_equal(raw, want.view(np.uint8))
    np.testing.assert_array_equal(raw, ggml_oracle.quantize(x, fmt))
    np.testing.assert_array_equal(np.asarray(formats.dequantize(raw, fmt)), want.astype(np.float32))


def test_bf16_bytes_match_gguf():
    x = SPECIAL[None, :]
    raw = np.asarray(formats.quantize(x, "bf16"))
    want = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint8).reshape(raw.shape)
    np.testing.assert_array_equal(raw, want)
    np.testing.assert_array_equal(np.asarray(formats.dequantize(raw, "bf16")),
                                  gguf.quants.dequantize(want, gguf.GGMLQuantizationType.BF16))


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)),
                  elements=st.floats(width=32)))
def test_float_formats_random(x):
    with np.errstate(over="ignore"):
        f16 = x.astype(np.float16)
    for fmt, want in [("f16", f16.view(np.uint8)),
                      ("bf16", gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint8)),
                      ("f32", x.view(np.uint8))]:
        np.testing.assert_array_equal(np.asarray(formats.quantize(x, fmt)), want.reshape(x.shape[0], -1))
