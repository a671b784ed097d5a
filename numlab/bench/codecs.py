"""Codec throughput: numlab's jitted quantize/dequantize against ggml's C in the same process.

Weights per second are medians (and bests) over repeated calls after a warm-up call, synchronised
with block_until_ready. ggml runs single-threaded through ctypes (ggml-python, a test extra: reported as
absent when it does not import). The device's copy bandwidth (bytes read + written by a large
elementwise pass) is measured in the same process; ours is also given as a fraction of it.
"""
import ctypes
import glob
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import numlab.formats as formats

try:
    import ggml
except ImportError:  # ggml-python is a test extra
    ggml = None

_GGML_NAMES = {"q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "q8_k": "Q8_K", "q8_0": "Q8_0", "q8_1": "Q8_1"}


def timings(fn, repeats: int, min_total_s: float = 1.0, max_calls: int = 500) -> dict:
    """Median and best wall time of fn() after one warm-up call: at least `repeats` timed calls, more
    (up to max_calls) until min_total_s has been timed, so that fast calls are not left to noise."""
    fn()
    times = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "best_s": min(times), "calls": len(times)}


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s read + written by a jitted float32 elementwise pass over nbytes on the default device.

    The buffer is donated, so the pass writes in place and no allocation is timed.
    """
    buf = [jnp.zeros(nbytes // 4, jnp.float32)]
    step = jax.jit(lambda v: v + 1, donate_argnums=0)

    def once():
        buf[0] = step(buf[0]).block_until_ready()

    return 2 * nbytes / timings(once, repeats)["median_s"]


class _Ggml:
    """ggml's single-threaded C codecs for whole buffers of rows (one C call per buffer)."""

    def __init__(self):
        ggml.ggml_cpu_init()
        libs = glob.glob(os.path.join(os.path.dirname(ggml.__file__), "lib", "libggml-base.*"))
        self._base = ctypes.CDLL(libs[0]) if libs else None

    def quantizer(self, fmt: str, x: np.ndarray):
        t = getattr(ggml, f"GGML_TYPE_{_GGML_NAMES[fmt]}")
        rows, n = x.shape
        out = np.zeros((rows, formats.row_bytes(fmt, n)), np.uint8)
        src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if fmt == "q8_k":
            fn = ggml.ggml_get_type_traits_cpu(t).contents.from_float
            return out, lambda: fn(src, out.ctypes.data, rows * n)
        if fmt == "q8_1":
            fn = ggml.ggml_get_type_traits(t).contents.from_float_ref
            return out, lambda: fn(src, out.ctypes.data, rows * n)
        return out, lambda: ggml.ggml_quantize_chunk(t, src, out.ctypes.data, 0, rows, n, None)

    def dequantizer(self, fmt: str, raw: np.ndarray, n: int):
        """None where ggml has no dequantizer (q8_1; q8_k only through dequantize_row_q8_K)."""
        out = np.zeros((raw.shape[0], n), np.float32)
        dst = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        k = raw.shape[0] * n
        if fmt == "q8_k":
            if self._base is None:
                return out, None
            fn = self._base.dequantize_row_q8_K
            return out, lambda: fn(ctypes.c_void_p(raw.ctypes.data), dst, ctypes.c_int64(k))
        to_float = ggml.ggml_get_type_traits(getattr(ggml, f"GGML_TYPE_{_GGML_NAMES[fmt]}")).contents.to_float
        if not to_float:
            return out, None
        return out, lambda: to_float(raw.ctypes.data, dst, k)


def _on_host(fn, fmt: str, a: np.ndarray) -> np.ndarray:
    """fn(a, fmt) jitted on the host CPU backend."""
    return np.asarray(jax.jit(fn, static_argnums=1)(jax.device_put(a, jax.devices("cpu")[0]), fmt))


def host_agrees(fmt: str, x: np.ndarray, raw: np.ndarray, deq: np.ndarray) -> tuple[bool, bool]:
    """Do the host CPU backend's quantize(x) bytes and dequantize(raw) bits equal raw and deq?"""
    same_bytes = np.array_equal(_on_host(formats.quantize, fmt, x), raw)
    same_floats = np.array_equal(_on_host(formats.dequantize, fmt, raw).view(np.uint32), deq.view(np.uint32))
    return bool(same_bytes), bool(same_floats)


def _ours(fmt: str, x_dev, n_weights: int, bw: float, repeats: int):
    """Timings of our jitted codecs on x_dev's device; returns (entry, bytes, dequantized floats)."""
    quant = jax.jit(formats.quantize, static_argnums=1)
    dequant = jax.jit(formats.dequantize, static_argnums=1)
    moved = n_weights * (4 + formats.spec(fmt).type_size / formats.spec(fmt).block_size)
    q_t = timings(lambda: quant(x_dev, fmt).block_until_ready(), repeats)
    raw_dev = quant(x_dev, fmt)
    d_t = timings(lambda: dequant(raw_dev, fmt).block_until_ready(), repeats)
    entry = {
        "bits_per_weight": 8 * formats.spec(fmt).type_size / formats.spec(fmt).block_size,
        "quantize": _side_by_side(n_weights, moved, q_t, bw),
        "dequantize": _side_by_side(n_weights, moved, d_t, bw),
        "bytes_equal_ggml": None, "dequantize_equal_ggml": None,
        "gpu_bytes_equal_cpu": None, "gpu_dequantize_equal_cpu": None,
    }
    return entry, np.asarray(raw_dev), np.asarray(dequant(raw_dev, fmt))


def _add_ggml(entry: dict, gg: _Ggml, fmt: str, x: np.ndarray, raw: np.ndarray, deq: np.ndarray, repeats: int):
    """ggml's timings beside ours, and whether its bytes and floats equal ours."""
    n_weights = x.size
    out, c_quant = gg.quantizer(fmt, x)
    entry["quantize"].update(_ggml_side(n_weights, timings(c_quant, repeats), entry["quantize"]))
    entry["bytes_equal_ggml"] = bool(np.array_equal(out, raw))
    c_out, c_dequant = gg.dequantizer(fmt, raw, x.shape[-1])
    if c_dequant is not None:
        entry["dequantize"].update(_ggml_side(n_weights, timings(c_dequant, repeats), entry["dequantize"]))
        entry["dequantize_equal_ggml"] = bool(np.array_equal(c_out.view(np.uint32), deq.view(np.uint32)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def run(rows: int, cols: int, fmts=formats.QUANT_FORMATS, repeats: int = 5, seed: int = 0,
        host_rows: int = 1024, progress=None) -> dict:
    """Throughput of quantize and dequantize per format on a standard-normal [rows, cols] matrix.

    On an accelerator, the first host_rows rows are also coded on the host CPU backend and compared.
    """
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    dev = jax.devices()[0]
    gg = _Ggml() if ggml is not None else None
    bw = copy_bandwidth(max(4 * x.size, 1 << 28), repeats)
    logging.info("copy bandwidth %.3g GB/s on %s", bw / 1e9, dev.device_kind)
    x_dev = jax.device_put(x, dev)
    results = {}
    for fmt in (progress(fmts) if progress else fmts):
        entry, raw, deq = _ours(fmt, x_dev, x.size, bw, repeats)
        if dev.platform != "cpu":
            entry["gpu_bytes_equal_cpu"], entry["gpu_dequantize_equal_cpu"] = host_agrees(
                fmt, x[:host_rows], raw[:host_rows], deq[:host_rows])
        if gg is not None:
            _add_ggml(entry, gg, fmt, x, raw, deq, repeats)
        logging.info("%s: %s", fmt, entry)
        results[fmt] = entry
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "ggml": "ggml-python " + getattr(ggml, "__version__", "?") if ggml is not None else "absent",
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "shape": [rows, cols],
        "weights": int(x.size),
        "repeats": repeats,
        "gpu_check_rows": min(rows, host_rows) if dev.platform != "cpu" else 0,
        "copy_bandwidth_bytes_per_s": bw,
        "notes": ("weights/s are medians (and bests) of >= `repeats` calls timing >= 1 s in all, after a "
                  "warm-up; ours jitted on the default device, allocating "
                  "its output; ggml's C single-threaded, one call per buffer into a reused buffer; copy "
                  "bandwidth: a donated in-place float32 pass over >= 256 MiB; "
                  "fraction_of_copy_bandwidth = (4 bytes of float32 + the format's bytes) per weight * "
                  "weights/s / copy bandwidth; ours_over_ggml > 1: ours faster"),
        "formats": results,
    }


def _side_by_side(n_weights: int, moved_bytes: float, t: dict, bw: float) -> dict:
    return {"ours_weights_per_s": n_weights / t["median_s"], "ours_best_weights_per_s": n_weights / t["best_s"],
            "ours_calls": t["calls"], "ours_fraction_of_copy_bandwidth": moved_bytes / t["median_s"] / bw,
            "ggml_weights_per_s": None, "ggml_best_weights_per_s": None, "ggml_calls": None,
            "ours_over_ggml": None, "ours_over_ggml_best": None}


def _ggml_side(n_weights: int, t: dict, ours: dict) -> dict:
    wps, best = n_weights / t["median_s"], n_weights / t["best_s"]
    return {"ggml_weights_per_s": wps, "ggml_best_weights_per_s": best, "ggml_calls": t["calls"],
            "ours_over_ggml": ours["ours_weights_per_s"] / wps,
            "ours_over_ggml_best": ours["ours_best_weights_per_s"] / best}
