"""GGML block codecs in pure JAX, byte-identical with ggml, and the QTensor pytree.

Each format module (`q4_k`, `q5_k`, `q6_k`, `q8_k`, `q8_0`, `q8_1`) defines BLOCK_SIZE, TYPE_SIZE,
GGML_TYPE, `quantize_blocks(x[..., nb, BLOCK_SIZE] f32) -> uint8[..., nb, TYPE_SIZE]`,
`dequantize_blocks(raw) -> f32[..., nb, BLOCK_SIZE]` and `unpack_blocks(raw) -> Unpacked`.
The plain float formats f32, f16 and bf16 are stored as their little-endian bytes.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
from jax import lax

QUANT_FORMATS = ("q4_k", "q5_k", "q6_k", "q8_k", "q8_0", "q8_1")
FLOAT_FORMATS = ("f32", "f16", "bf16")
FORMATS = QUANT_FORMATS + FLOAT_FORMATS
_FLOAT_DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
_GGML_FLOAT_TYPES = {"f32": 0, "f16": 1, "bf16": 30}


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """What a format is: values per block, bytes per block, and ggml's type id."""

    name: str
    block_size: int
    type_size: int
    ggml_type: int


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return fmt


def codec(fmt: str):
    """The module implementing quantized format `fmt`."""
    if _check_fmt(fmt) not in QUANT_FORMATS:
        raise ValueError(f"{fmt!r} is a plain float format with no block codec module")
    return importlib.import_module(f"numlab.formats.{fmt}")


def spec(fmt: str) -> FormatSpec:
    """Block size, bytes per block and ggml type id of `fmt`."""
    if _check_fmt(fmt) in FLOAT_FORMATS:
        size = jnp.dtype(_FLOAT_DTYPES[fmt]).itemsize
        return FormatSpec(fmt, 1, size, _GGML_FLOAT_TYPES[fmt])
    m = codec(fmt)
    return FormatSpec(fmt, m.BLOCK_SIZE, m.TYPE_SIZE, m.GGML_TYPE)


def fmt_of_ggml_type(ggml_type: int) -> str:
    """The numlab format name of a ggml type id; ValueError for types numlab does not handle."""
    for f in FORMATS:
        if spec(f).ggml_type == int(ggml_type):
            return f
    raise ValueError(f"unsupported ggml type {int(ggml_type)}; supported: "
                     + ", ".join(f"{f} ({spec(f).ggml_type})" for f in FORMATS))


def row_bytes(fmt: str, n: int) -> int:
    """Bytes of one row of n values in `fmt` (n must be a multiple of the block size)."""
    s = spec(fmt)
    if n % s.block_size:
        raise ValueError(f"row length {n} is not a multiple of the {fmt} block size {s.block_size}")
    return n // s.block_size * s.type_size


def quantize(x, fmt: str) -> jax.Array:
    """float32 [..., n] -> uint8 [..., n / block_size * type_size], ggml's bytes for `fmt`."""
    s = spec(fmt)
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"quantize expects float32 input, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("quantize expects an array of rank >= 1 (last axis: values), got a scalar")
    n = x.shape[-1]
    if n % s.block_size:
        raise ValueError(f"last axis length {n} is not a multiple of the {fmt} block size {s.block_size}")
    if fmt in FLOAT_FORMATS:
        return lax.bitcast_convert_type(x.astype(_FLOAT_DTYPES[fmt]), jnp.uint8).reshape(
            x.shape[:-1] + (n * s.type_size,))
    blocks = x.reshape(x.shape[:-1] + (n // s.block_size, s.block_size))
    return codec(fmt).quantize_blocks(blocks).reshape(x.shape[:-1] + (n // s.block_size * s.type_size,))


def _blocks(raw, fmt: str):
    s = spec(fmt)
    raw = jnp.asarray(raw)
    if raw.dtype != jnp.uint8:
        raise TypeError(f"{fmt} data must be uint8 bytes, got {raw.dtype}")
    if raw.ndim < 1:
        raise ValueError(f"{fmt} data must have rank >= 1 (last axis: bytes), got a scalar")
    nbytes = raw.shape[-1]
    if nbytes % s.type_size:
        raise ValueError(f"last axis of {nbytes} bytes is not a multiple of the {fmt} block of {s.type_size} bytes")
    return raw.reshape(raw.shape[:-1] + (nbytes // s.type_size, s.type_size)), s


def dequantize(raw, fmt: str) -> jax.Array:
    """uint8 [..., nbytes] -> float32 [..., n]: ggml's dequantize_row for `fmt`, bit for bit."""
    blocks, s = _blocks(raw, fmt)
    if fmt in FLOAT_FORMATS:
        return lax.bitcast_convert_type(blocks, _FLOAT_DTYPES[fmt]).astype(jnp.float32).reshape(
            blocks.shape[:-2] + (-1,))
    out = codec(fmt).dequantize_blocks(blocks)
    return out.reshape(out.shape[:-2] + (-1,))


def unpack(raw, fmt: str):
    """uint8 [..., nbytes] -> Unpacked with a block axis: codes [..., nb, block_size], scales per block."""
    blocks, _ = _blocks(raw, fmt)
    return codec(fmt).unpack_blocks(blocks)


from numlab.formats.qtensor import QTensor  # noqa: E402  (QTensor uses the registry above)

__all__ = ["FORMATS", "QUANT_FORMATS", "FLOAT_FORMATS", "FormatSpec", "spec", "codec", "row_bytes",
           "quantize", "dequantize", "unpack", "fmt_of_ggml_type", "QTensor"]
