"""numlab.models.gguf_check against damaged and hostile GGUF files: a hypothesis fuzz over corrupted
variants of a valid tiny file (no exception but GGUFError, bounded time per case, accepted files
map only bytes inside the file), and one test per failure class (the message names file and field)."""
import collections
import math
import signal
import struct
import time

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numlab.formats as formats
from numlab.errors import GGUFError
from numlab.formats import QTensor
from numlab.models import config as config_lib
from numlab.models.gguf_check import MAX_METADATA_ELEMENTS, open_gguf, require_kv
from numlab.models.gguf_io import load_gguf, save_gguf
from numlab.models.qwen3_moe import Model, check_model
from numlab.models.synthetic import q4_k_m_format

MODEL_CONFIG = config_lib.Qwen3MoeConfig(n_layers=1, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64,
                                         n_experts=2, n_experts_used=1, d_expert=256, vocab=16)
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
KINDS = {"general.architecture": str, "t.block_count": int, "t.i8": int, "t.i32": int, "t.u64": int,
         "t.eps": float, "t.f64": float, "t.flag": bool, "t.tokens": list[str], "t.scores": list[float],
         "t.types": list[int], "general.alignment": int}


def _write_valid(path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "t")
    w.add_uint32("t.block_count", 2)
    w.add_int8("t.i8", -3)
    w.add_int32("t.i32", -70000)
    w.add_uint64("t.u64", 2**40)
    w.add_float32("t.eps", 1e-6)
    w.add_float64("t.f64", 0.25)
    w.add_bool("t.flag", True)
    w.add_uint32("general.alignment", 32)
    w.add_array("t.tokens", ["<s>", "a", "bc", "déf"])
    w.add_array("t.scores", [0.5, -1.0, 2.0])
    w.add_array("t.types", [1, 2, 3])
    w.add_tensor("f32", rng.standard_normal((3, 32)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 16)).astype(np.float16))
    w.add_tensor("q8_0", rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_k", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _parsed(path):
    """(bytes of the valid file at path, (offset, width) of every parsed header/metadata/table field,
    offset of the tensor data)."""
    reader = open_gguf(path)
    base = reader.data.ctypes.data
    parts = [p for f in reader.fields.values() for p in f.parts]
    parts += [p for t in reader.tensors for p in t.field.parts]
    fields = sorted({(p.ctypes.data - base, p.dtype.itemsize if p.dtype.itemsize > 1 else p.nbytes)
                     for p in parts if p.nbytes})
    with open(path, "rb") as f:
        return f.read(), tuple(fields), reader.data_offset


INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 255, 256, 2**16 - 1, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


def _mutations(n, fields, span):
    """Byte flips, truncations, overwritten parsed fields, inserted and deleted bytes; positions
    other than truncations fall in the first `span` bytes."""
    pos = st.integers(0, min(n, span) - 1)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, n - 1)),
        st.tuples(st.just("field"), st.sampled_from(fields),
                  st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)),
                  st.sampled_from((0, 1, -1))),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
    )


def _apply(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind, at = m[0], (m[1] if m[0] != "field" else m[1][0])
        if kind == "flip" and at < len(b):
            b[at] ^= m[2]
        elif kind == "truncate":
            del b[at:]
        elif kind == "field" and at < len(b):
            width = min(m[1][1], 8, len(b) - at)
            b[at:at + width] = ((m[2] + m[3]) % 256**8).to_bytes(8, "little")[:width]
        elif kind == "insert":
            b[at:at] = m[2]
        elif kind == "delete":
            del b[at:at + m[2]]
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("open_gguf ran past 5 s")


def _fuzz(tmp_path, data, fields, open_and_check, n_examples, span):
    """Run open_and_check(path) on corrupted variants of data; returns (stats, distinct variants,
    non-numlab exceptions, slowest case in seconds)."""
    stats, others, seen, slowest = collections.Counter(), [], set(), [0.0]
    old = signal.signal(signal.SIGALRM, _alarm)

    @settings(max_examples=n_examples)
    @given(st.lists(_mutations(len(data), fields, span), min_size=1, max_size=3))
    def one_case(muts):
        variant = _apply(data, muts)
        seen.add(variant)
        path = tmp_path / f"v{len(seen)}-{stats.total()}.gguf"
        path.write_bytes(variant)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        try:
            open_and_check(path, variant, stats)
            stats["accepted"] += 1
        except GGUFError as e:
            stats["fallback" if ": gguf reader:" in str(e) else "GGUFError"] += 1
            stats["GGUFError " + str(e)[len(str(path)) + 2:].split()[0]] += 1
            if not str(e).startswith(f"{path}: "):
                others.append(f"{muts}: message does not start with the file: {e}")
        except Exception as e:  # noqa: BLE001 - the fuzz counts every other exception
            others.append(f"{muts}: {type(e).__name__}: {e}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            slowest[0] = max(slowest[0], time.perf_counter() - t0)
            path.unlink()

    try:
        one_case()
    finally:
        signal.signal(signal.SIGALRM, old)
    return stats, len(seen), others, slowest[0]


def _open_and_require(path, variant, stats):
    reader = open_gguf(path)
    for t in reader.tensors:
        assert t.data_offset + t.n_bytes <= len(variant) and t.data.nbytes == t.n_bytes
    for key, kind in KINDS.items():
        try:
            require_kv(reader, key, kind)
        except GGUFError:
            stats["require_kv GGUFError"] += 1


def test_fuzz_open_gguf(tmp_path):
    _write_valid(tmp_path / "valid.gguf")
    data, fields, _ = _parsed(tmp_path / "valid.gguf")
    stats, distinct, others, slowest = _fuzz(tmp_path, data, fields, _open_and_require, 3000, len(data))
    print(f"\nopen_gguf fuzz: {distinct} distinct variants, {dict(stats)}, slowest case {slowest * 1e3:.1f} ms")
    assert others == [], f"{len(others)} non-numlab exceptions, e.g. {others[:3]}"
    assert distinct >= 1000
    assert stats["fallback"] == 0, "GGUFReader failed on a file the pre-scan passed"
    assert stats["GGUFError"] >= 1000 and stats["accepted"] >= 100
    assert slowest < 2.0


def _write_model(path):
    """A 1-layer Qwen3-MoE GGUF with the Q4_K_M type mix and random weight bytes (loading reads no values)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in config_lib.tensor_shapes(MODEL_CONFIG).items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, np.float32)
            continue
        fmt = q4_k_m_format(name, MODEL_CONFIG)
        raw = rng.integers(0, 256, shape[:-1] + (formats.row_bytes(fmt, shape[-1]),), dtype=np.uint8)
        tensors[name] = QTensor.from_bytes(raw, fmt, shape[-2:])
    save_gguf(Model(tensors=tensors, config=MODEL_CONFIG), path)


def _load_and_check(path, variant, stats):
    model = load_gguf(path)
    check_model(model)
    assert model.config.n_layers == MODEL_CONFIG.n_layers


def test_fuzz_load_gguf(tmp_path):
    """The model loader on corrupted qwen3moe files: GGUFError or a model that matches its config."""
    path = tmp_path / "model.gguf"
    _write_model(path)
    data, fields, data_offset = _parsed(path)
    stats, distinct, others, slowest = _fuzz(tmp_path, data, fields, _load_and_check, 1000, data_offset + 64)
    print(f"\nload_gguf fuzz: {distinct} distinct variants, {dict(stats)}, slowest case {slowest * 1e3:.1f} ms")
    assert others == [], f"{len(others)} non-numlab exceptions, e.g. {others[:3]}"
    assert distinct >= 800 and stats["GGUFError"] >= 500 and stats["fallback"] == 0
    assert slowest < 2.0


# --- hand-built files, one per failure class -------------------------------------------------------

def _s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, vtype, payload) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name, dims, ggml_type=Q.F32, offset=0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def _file(kvs=(), infos=(), data=128, version=3, magic=b"GGUF", n_tensors=None, n_kv=None) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % 32) + bytes(data)


U32 = struct.pack("<I", 1)
GOOD_T = _ti("w", (8, 2))
CASES = {
    "empty": (b"", "header magic"),
    "truncated header": (b"GGUF\x03\x00", "header version"),
    "bad magic": (_file(magic=b"GGML"), "header magic"),
    "bad version": (_file(version=7), "header version"),
    "version 1": (_file(version=1), "header version"),
    "huge tensor_count": (_file(n_tensors=2**64 - 1), "header tensor_count"),
    "huge kv_count": (_file(n_kv=2**40), "header kv_count"),
    "key length overflow": (_file([struct.pack("<Q", 2**64 - 1)]), "metadata #0 key"),
    "unknown value type": (_file([_kv("k", 99, U32)]), "metadata 'k' type"),
    "array length past EOF": (_file([_kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, 10**5))], data=0),
                              "metadata 'a' array"),
    "array length huge": (_file([_kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, 2**64 - 1))]),
                          "metadata 'a' array length"),
    "too many array elements": (_file([_kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, MAX_METADATA_ELEMENTS + 1))],
                                      data=MAX_METADATA_ELEMENTS + 1), "metadata 'a' array length"),
    "string array past EOF": (_file([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 10**6))]),
                              "metadata 'a' array of 1000000 strings"),
    "nested array": (_file([_kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1))]), "metadata 'a' array element type"),
    "duplicate key": (_file([_kv("k", V.UINT32, U32), _kv("k", V.UINT32, U32)]), "metadata 'k'"),
    "reserved key": (_file([_kv("GGUF.version", V.UINT32, U32)]), "metadata 'GGUF.version'"),
    "string length overflow": (_file([_kv("s", V.STRING, struct.pack("<Q", 2**63))]), "metadata 's' string"),
    "alignment type": (_file([_kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]),
                       "metadata 'general.alignment'"),
    "alignment as string": (_file([_kv("general.alignment", V.STRING, _s("32"))]), "metadata 'general.alignment'"),
    "alignment not power of 2": (_file([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]),
                                 "metadata 'general.alignment'"),
    "bad utf-8 key": (_file([_kv(b"\xff\xfe", V.UINT32, U32)]), "metadata #0 key"),
    "absurd n_dims": (_file(infos=[_s("w") + struct.pack("<I", 2**32 - 1)]), "tensor #0 'w' n_dims"),
    "zero dim": (_file(infos=[_ti("w", (8, 0))]), "tensor #0 'w' dims[1]"),
    "element count overflow": (_file(infos=[_ti("w", (2**32, 2**32, 2**32, 2**32))]), "tensor #0 'w' data offset"),
    "unknown quant type": (_file(infos=[_ti("w", (8, 2), ggml_type=4)]), "tensor #0 'w' type"),
    "huge quant type": (_file(infos=[_ti("w", (8, 2), ggml_type=2**31)]), "tensor #0 'w' type"),
    "row not multiple of block": (_file(infos=[_ti("w", (100, 2), ggml_type=Q.Q4_K)]), "tensor #0 'w' dims[0]"),
    "data offset out of bounds": (_file(infos=[_ti("w", (8, 2), offset=4096)]), "tensor #0 'w' data offset"),
    "data offset overflow": (_file(infos=[_ti("w", (8, 2), offset=2**64 - 32)]), "tensor #0 'w' data offset"),
    "misaligned data offset": (_file(infos=[_ti("w", (8, 2), offset=4)]), "tensor #0 'w' data offset"),
    "overlapping tensors": (_file(infos=[GOOD_T, _ti("v", (8, 2), offset=32)]), "tensor #1 'v' data offset"),
    "duplicate tensor name": (_file(infos=[GOOD_T, _ti("w", (8, 2), offset=64)]), "tensor #1 'w'"),
    "bad utf-8 tensor name": (_file(infos=[_ti(b"\xc3(", (8, 2))]), "tensor #0 name"),
    "truncated tensor data": (_file(infos=[GOOD_T], data=40), "tensor #0 'w' data offset"),
    "truncated tensor table": (_file(infos=[GOOD_T])[:50], "tensor #0 'w' dims[1]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_failure_class_names_file_and_field(tmp_path, case):
    data, field = CASES[case]
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        open_gguf(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert msg.startswith(f"{path}: {field}"), msg
    assert ": gguf reader:" not in msg


def test_hand_built_file_is_valid_before_corruption(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_file([_kv("k", V.UINT32, U32)], [GOOD_T, _ti("v", (8, 2), offset=64)]))
    reader = open_gguf(path)
    assert [t.name for t in reader.tensors] == ["w", "v"]
    assert require_kv(reader, "k", int) == 1


def test_missing_file_and_folder(tmp_path):
    for path, what in ((tmp_path / "nope.gguf", "cannot open"), (tmp_path, "not a regular file")):
        with pytest.raises(GGUFError, match=what) as info:
            open_gguf(path)
        assert str(info.value).startswith(f"{path}: file:")


def test_valid_file_round_trips(tmp_path):
    path = tmp_path / "valid.gguf"
    _write_valid(path)
    reader = open_gguf(path)
    assert [(t.name, t.tensor_type) for t in reader.tensors] == [
        ("f32", Q.F32), ("f16", Q.F16), ("q8_0", Q.Q8_0), ("q4_k", Q.Q4_K)]
    assert reader.tensors[3].data.shape == (2, 144)
    values = {k: require_kv(reader, k, kind) for k, kind in KINDS.items()}
    assert values["t.tokens"] == ["<s>", "a", "bc", "déf"] and values["t.i32"] == -70000
    assert values["t.u64"] == 2**40 and values["t.flag"] is True and values["general.alignment"] == 32
    assert math.isclose(values["t.eps"], 1e-6, rel_tol=1e-7) and values["t.scores"] == [0.5, -1.0, 2.0]


def test_big_endian_file_loads(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "t", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("t.block_count", 3)
    w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = open_gguf(path)
    assert require_kv(reader, "t.block_count", int) == 3
    np.testing.assert_array_equal(reader.tensors[0].data.astype(np.float32), np.arange(64).reshape(2, 32))


@pytest.mark.parametrize("key,kind,problem", [
    ("t.eps", int, "has type FLOAT32, expected INT16"),
    ("t.block_count", float, "has type UINT32, expected FLOAT32, FLOAT64"),
    ("t.tokens", str, "has type ARRAY of STRING, expected STRING"),
    ("t.tokens", list[int], "has type ARRAY of STRING, expected ARRAY of INT16"),
    ("t.block_count", list[int], "has type UINT32, expected ARRAY of"),
    ("t.flag", int, "has type BOOL"),
    ("t.absent", int, "missing"),
])
def test_require_kv_wrong_type_names_file_and_key(tmp_path, key, kind, problem):
    path = tmp_path / "valid.gguf"
    _write_valid(path)
    with pytest.raises(GGUFError) as info:
        require_kv(open_gguf(path), key, kind)
    assert str(info.value).startswith(f"{path}: metadata '{key}': {problem}"), str(info.value)


@pytest.mark.parametrize("vtype,payload,kind,problem", [
    (V.BOOL, b"\x07", bool, "BOOL byte other than 0 or 1"),
    (V.FLOAT32, struct.pack("<f", math.nan), float, "non-finite"),
    (V.STRING, _s(b"\xff\xfe"), str, "not valid UTF-8"),
])
def test_require_kv_bad_values(tmp_path, vtype, payload, kind, problem):
    path = tmp_path / "v.gguf"
    path.write_bytes(_file([_kv("k", vtype, payload)]))
    with pytest.raises(GGUFError, match=problem) as info:
        require_kv(open_gguf(path), "k", kind)
    assert str(info.value).startswith(f"{path}: metadata 'k'")


def test_require_kv_rejects_unknown_kind(tmp_path):
    path = tmp_path / "valid.gguf"
    _write_valid(path)
    with pytest.raises(ValueError, match="list\\[str\\]"):
        require_kv(open_gguf(path), "t.eps", bytes)
