"""ggml itself (through ggml-python, built from source) as the oracle for codecs and CPU dots."""
import ctypes

import ggml
import numpy as np

ggml.ggml_cpu_init()  # without it the CPU vec_dot kernels return 0

TYPES = {
    "q4_k": ggml.GGML_TYPE_Q4_K,
    "q5_k": ggml.GGML_TYPE_Q5_K,
    "q6_k": ggml.GGML_TYPE_Q6_K,
    "q8_k": ggml.GGML_TYPE_Q8_K,
    "q8_0": ggml.GGML_TYPE_Q8_0,
    "q8_1": ggml.GGML_TYPE_Q8_1,
    "f32": ggml.GGML_TYPE_F32,
    "f16": ggml.GGML_TYPE_F16,
}
NAMES = {v: k for k, v in TYPES.items()}


def row_bytes(fmt: str, n: int) -> int:
    return int(ggml.ggml_row_size(TYPES[fmt], n))


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """ggml's bytes for float32 rows x[rows, n]: ggml_quantize_chunk (no imatrix) for
    q4_k/q5_k/q6_k/q8_0, the CPU quantize_row_q8_K for q8_k, quantize_row_q8_1_ref for q8_1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.reshape(-1, x.shape[-1]).shape
    nb = row_bytes(fmt, n)
    out = np.zeros((rows, nb), dtype=np.uint8)
    t = TYPES[fmt]
    if fmt == "q8_k":
        fn = ggml.ggml_get_type_traits_cpu(t).contents.from_float
        for r in range(rows):
            fn(_fptr(x.reshape(rows, n)[r]), out[r].ctypes.data, n)
    elif fmt == "q8_1":
        fn = ggml.ggml_get_type_traits(t).contents.from_float_ref
        for r in range(rows):
            fn(_fptr(x.reshape(rows, n)[r]), out[r].ctypes.data, n)
    else:
        ggml.ggml_quantize_chunk(t, _fptr(x), out.ctypes.data, 0, rows, n, None)
    return out.reshape(x.shape[:-1] + (nb,))


def dequantize(raw: np.ndarray, fmt: str, n: int) -> np.ndarray:
    """ggml's dequantize_row_* (to_float) for rows of raw bytes, each of n values."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.reshape(-1, raw.shape[-1]).shape[0]
    out = np.zeros((rows, n), dtype=np.float32)
    fn = ggml.ggml_get_type_traits(TYPES[fmt]).contents.to_float
    flat = raw.reshape(rows, -1)
    for r in range(rows):
        fn(flat[r].ctypes.data, _fptr(out[r]), n)
    return out.reshape(raw.shape[:-1] + (n,))


def vec_dot(w_raw: np.ndarray, fmt: str, x: np.ndarray) -> np.ndarray:
    """ggml's CPU matvec: x quantized by the CPU from_float of fmt's vec_dot_type, then the
    CPU vec_dot of each weight row with it (e.g. vec_dot_q4_K_q8_K). Returns float32 [rows]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    traits = ggml.ggml_get_type_traits_cpu(TYPES[fmt]).contents
    dot_t = traits.vec_dot_type
    if dot_t == ggml.GGML_TYPE_F32:
        xq = x.view(np.uint8).copy()
    else:
        xq = np.zeros(row_bytes(NAMES[dot_t], n), dtype=np.uint8)
        ggml.ggml_get_type_traits_cpu(dot_t).contents.from_float(_fptr(x), xq.ctypes.data, n)
    w = np.ascontiguousarray(w_raw, dtype=np.uint8).reshape(-1, row_bytes(fmt, n))
    out = np.zeros(w.shape[0], dtype=np.float32)
    s = ctypes.c_float()
    for r in range(w.shape[0]):
        traits.vec_dot(n, ctypes.byref(s), 0, w[r].ctypes.data, 0, xq.ctypes.data, 0, 1)
        out[r] = s.value
    return out
