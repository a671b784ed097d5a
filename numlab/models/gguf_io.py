"""Qwen3-MoE models from and to GGUF files (llama.cpp's `qwen3moe` layout).

load_gguf memory-maps the file (gguf_check.open_gguf, then gguf.GGUFReader): tensors stay quantized,
as numpy views of the file's bytes inside QTensors, until a computation moves them to a device.
"""
import os

import gguf
import numpy as np

import numlab.formats as formats
from numlab.errors import GGUFError
from numlab.formats import QTensor
from numlab.models import config as config_lib
from numlab.models.gguf_check import open_gguf, require_kv
from numlab.models.qwen3_moe import Model, check_model

WEIGHT_FORMATS = ("q4_k", "q5_k", "q6_k", "q8_0", "f32", "f16", "bf16")
QUANTIZATION_VERSION = 2


def load_gguf(path) -> Model:
    """The Model in GGUF file `path`; GGUFError naming the file, the tensor or key, and what was
    expected for a wrong architecture, a missing key or tensor, a shape or type mismatch, an
    unsupported type or an unexpected tensor."""
    path = os.fspath(path)
    reader = open_gguf(path)
    arch = require_kv(reader, "general.architecture", str)
    if arch != config_lib.ARCH:
        raise GGUFError(f"{path}: metadata 'general.architecture': is {arch!r}, expected {config_lib.ARCH!r}")
    values = {key: require_kv(reader, key, kind) for key, kind in config_lib.METADATA.values()}
    if reader.get_field(config_lib.VALUE_LENGTH_KEY) is not None:
        value_length = require_kv(reader, config_lib.VALUE_LENGTH_KEY, int)
        key_length = values[config_lib.METADATA["head_dim"][0]]
        if value_length != key_length:
            raise GGUFError(f"{path}: metadata '{config_lib.VALUE_LENGTH_KEY}': is {value_length}, expected "
                            f"the key length {key_length} (numlab's Qwen3-MoE has equal key and value heads)")
    found = {t.name: t for t in reader.tensors}
    embd = _find(path, found, "token_embd", "a [vocab, embedding_length] matrix")
    try:
        config = config_lib.from_gguf_metadata(values, vocab=int(embd.shape[1]) if len(embd.shape) > 1 else 0)
    except ValueError as e:
        raise GGUFError(f"{path}: metadata: {e}") from e
    blocks = {name.split(".")[1] for name in found if name.startswith("blk.")}
    if config.n_layers > len(blocks):  # checked before tensor_shapes loops over a hostile layer count
        raise GGUFError(f"{path}: metadata '{config_lib.METADATA['n_layers'][0]}': {config.n_layers} layers, "
                        f"but the tensor table holds blk.N tensors for {len(blocks)}")
    tensors = {}
    for name, shape in config_lib.tensor_shapes(config).items():
        tensors[name] = _tensor(path, _find(path, found, name, f"shape {list(shape)}"), name, shape)
    extra = sorted(set(found) - {n + ".weight" for n in tensors})
    if extra:
        layer = ", ".join(config_lib.layer_tensor_shapes(config))
        raise GGUFError(f"{path}: tensor table: unexpected tensors {extra[:8]} (a qwen3moe file holds "
                        f"token_embd, output_norm, output and blk.N.{{{layer}}})")
    return Model(tensors=tensors, config=config)


def _find(path, found, name, what):
    t = found.get(name + ".weight")
    if t is None:
        raise GGUFError(f"{path}: tensor '{name}.weight': missing (expected {what})")
    return t


def _tensor(path, t, name, shape):
    """The tensor's bytes as a QTensor (matrices) or a float32 vector (norms), views of the memory map."""
    field = f"{path}: tensor '{name}.weight'"
    try:
        fmt = formats.fmt_of_ggml_type(int(t.tensor_type))
    except ValueError as e:
        raise GGUFError(f"{field}: {e}") from e
    got = tuple(int(d) for d in reversed(t.shape[: len(t.shape)]))
    if got != tuple(shape):
        raise GGUFError(f"{field}: shape {list(got)}, expected {list(shape)}")
    raw = np.asarray(t.data).view(np.uint8)
    if len(shape) == 1:
        if fmt != "f32":
            raise GGUFError(f"{field}: type {fmt}, expected f32 (norm weights)")
        return raw.view(np.float32).reshape(shape)
    if fmt not in WEIGHT_FORMATS:
        raise GGUFError(f"{field}: type {fmt} is not a weight format; supported: {', '.join(WEIGHT_FORMATS)}")
    rows, cols = shape[-2:]
    return QTensor.from_bytes(raw.reshape(shape[:-1] + (formats.row_bytes(fmt, cols),)), fmt, (rows, cols))


def save_gguf(model: Model, path) -> None:
    """Write model to `path` as a qwen3moe GGUF file (metadata from its config, tensors as stored)."""
    check_model(model)
    w = gguf.GGUFWriter(os.fspath(path), config_lib.ARCH)
    w.add_quantization_version(QUANTIZATION_VERSION)
    for key, value in config_lib.to_gguf_metadata(model.config).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in model.tensors.items():
        if isinstance(t, QTensor):
            gtype = gguf.GGMLQuantizationType(formats.spec(t.fmt).ggml_type)
            w.add_tensor(name + ".weight", np.asarray(t.data, np.uint8), raw_dtype=gtype)
        else:
            w.add_tensor(name + ".weight", np.asarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
