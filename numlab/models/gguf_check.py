"""Safe opening of GGUF files from strangers.

`open_gguf` walks the header, the metadata and the tensor table with bounds checks before
`gguf.GGUFReader` parses the file, so a truncated, damaged or hostile file raises one GGUFError
naming the file, the field and what was wrong, instead of a crash, a hang (GGUFReader loops over
array lengths it never checks against the file size), a huge allocation or silently wrong tensors.
The walk only checks; GGUFReader stays the parser.
"""
import os
import stat
import struct
import typing

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from numlab.errors import GGUFError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4
# GGUFReader spends ~10 us and ~700 bytes per metadata array element and about 1 KB per tensor
# or key; these caps bound a hostile file's cost (real models: < 1M array elements, < 2k tensors).
MAX_METADATA_ELEMENTS = 1 << 20
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")

_SCALAR_FMT = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "B", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_KIND_TYPES = {
    int: frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
                    GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
                    GGUFValueType.UINT64, GGUFValueType.INT64}),
    float: frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}),
    str: frozenset({GGUFValueType.STRING}),
    bool: frozenset({GGUFValueType.BOOL}),
}


def _type_names(types) -> str:
    return ", ".join(sorted(t.name for t in types))


class _Cursor:
    """Bounds-checked little- or big-endian reads from a byte buffer; errors name file and field."""

    def __init__(self, buf, path, endian):
        self.buf, self.path, self.endian, self.pos = buf, path, endian, 0

    def fail(self, field, problem):
        raise GGUFError(f"{self.path}: {field}: {problem}")

    def need(self, n, field):
        if n > len(self.buf) - self.pos:
            self.fail(field, f"needs {n} bytes at offset {self.pos} but the file ends at {len(self.buf)} "
                             "(truncated or corrupt)")

    def read(self, fmt, field):
        size = struct.calcsize(fmt)
        self.need(size, field)
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n, field):
        self.need(n, field)
        self.pos += n

    def string(self, field) -> str:
        n = self.read("Q", f"{field} length")
        self.need(n, field)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(field, f"is not valid UTF-8 ({e.reason} at byte {e.start})")

    def value_type(self, field) -> GGUFValueType:
        raw = self.read("I", field)
        try:
            return GGUFValueType(raw)
        except ValueError:
            self.fail(field, f"unknown value type {raw}; valid: "
                             + ", ".join(f"{t.value} ({t.name})" for t in GGUFValueType))


def _header(cur):
    cur.need(4, "header magic")
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        cur.fail("header magic", f"got {magic!r}, expected {MAGIC!r} (not a GGUF file)")
    cur.pos = 4
    version = cur.read("I", "header version")
    if version & 0xFFFF == 0:
        cur.endian = ">"
        version = struct.unpack_from(">I", cur.buf, 4)[0]
    if version not in VERSIONS:
        cur.fail("header version", f"got {version}, valid: {', '.join(map(str, VERSIONS))}")
    n_tensors = cur.read("Q", "header tensor_count")
    n_kv = cur.read("Q", "header kv_count")
    room = len(cur.buf) - cur.pos
    for field, n, cap, min_bytes in (("header tensor_count", n_tensors, MAX_TENSORS, 24),
                                     ("header kv_count", n_kv, MAX_KV, 13)):
        if n > cap or n * min_bytes > room:
            cur.fail(field, f"{n} entries cannot fit in the {room} bytes after the header "
                            f"(each needs >= {min_bytes} bytes; numlab's limit is {cap})")
    return n_tensors, n_kv


def _metadata(cur, n_kv):
    """Walk the key/value section; return general.alignment."""
    keys, elements, alignment = set(), 0, gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"metadata #{i} key")
        field = f"metadata '{key}'"
        if key in keys or key in RESERVED_KEYS:
            cur.fail(field, "duplicate key" if key in keys else "reserved key name")
        keys.add(key)
        vtype = cur.value_type(f"{field} type")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                cur.fail(field, f"has type {vtype.name}, expected UINT32")
            alignment = cur.read("I", field)
            if alignment == 0 or alignment & (alignment - 1):
                cur.fail(field, f"{alignment} is not a power of two")
        elif vtype == GGUFValueType.ARRAY:
            itype = cur.value_type(f"{field} array element type")
            n = cur.read("Q", f"{field} array length")
            elements += n
            if itype == GGUFValueType.ARRAY:
                cur.fail(f"{field} array element type", "nested arrays are not supported")
            if elements > MAX_METADATA_ELEMENTS:
                cur.fail(f"{field} array length", f"{n} elements take the file past numlab's limit of "
                                                  f"{MAX_METADATA_ELEMENTS} metadata array elements")
            if itype == GGUFValueType.STRING:
                cur.need(8 * n, f"{field} array of {n} strings")
                for j in range(n):
                    cur.skip(cur.read("Q", f"{field}[{j}] length"), f"{field}[{j}]")
            else:
                cur.skip(n * struct.calcsize(_SCALAR_FMT[itype]), f"{field} array of {n} {itype.name}")
        elif vtype == GGUFValueType.STRING:
            cur.skip(cur.read("Q", f"{field} string length"), f"{field} string")
        else:
            cur.skip(struct.calcsize(_SCALAR_FMT[vtype]), f"{field} {vtype.name} value")
    return alignment


def _tensor_infos(cur, n_tensors):
    """Walk the tensor table; return [(field, offset, n_bytes)]."""
    names, infos = set(), []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        field = f"tensor #{i} '{name}'"
        if name in names:
            cur.fail(field, "duplicate tensor name")
        names.add(name)
        n_dims = cur.read("I", f"{field} n_dims")
        if n_dims > MAX_DIMS:
            cur.fail(f"{field} n_dims", f"{n_dims} dimensions, valid: 0 to {MAX_DIMS}")
        dims = [cur.read("Q", f"{field} dims[{j}]") for j in range(n_dims)]
        for j, d in enumerate(dims):
            if not 1 <= d < 1 << 62:
                cur.fail(f"{field} dims[{j}]", f"{d} is not a dimension in [1, 2**62)")
        raw_type = cur.read("I", f"{field} type")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            cur.fail(f"{field} type", f"unknown ggml type {raw_type}; valid: "
                                      + ", ".join(f"{t.value} ({t.name})" for t in GGML_QUANT_SIZES))
        row = dims[0] if dims else 1
        if row % block:
            cur.fail(f"{field} dims[0]", f"row length {row} is not a multiple of {qtype.name}'s "
                                         f"block size {block}")
        n_bytes = int(np.prod(dims, dtype=object)) // block * type_size
        offset = cur.read("Q", f"{field} data offset")
        infos.append((field, offset, n_bytes))
    return infos


def _check_data(cur, infos, alignment):
    start = -(-cur.pos // alignment) * alignment
    size = len(cur.buf)
    for field, offset, n_bytes in infos:
        if offset % alignment:
            cur.fail(f"{field} data offset", f"{offset} is not a multiple of the alignment {alignment}")
        if start + offset + n_bytes > size:
            cur.fail(f"{field} data offset", f"{n_bytes} bytes at data offset {offset} (file offset "
                                             f"{start + offset}) run past the end of the file ({size} bytes)")
    spans = sorted((offset, offset + n_bytes, field) for field, offset, n_bytes in infos)
    for (_, end, prev), (begin, _, field) in zip(spans, spans[1:]):
        if begin < end:
            cur.fail(f"{field} data offset", f"data overlaps that of {prev}")


def _scan(path, buf):
    cur = _Cursor(buf, path, "<")
    n_tensors, n_kv = _header(cur)
    alignment = _metadata(cur, n_kv)
    infos = _tensor_infos(cur, n_tensors)
    _check_data(cur, infos, alignment)
    return infos


def open_gguf(path) -> gguf.GGUFReader:
    """A memory-mapped gguf.GGUFReader for path, after checks that raise GGUFError on a bad file."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{path}: file: not a regular file")
        if st.st_size == 0:
            raise GGUFError(f"{path}: header magic: the file is empty")
        buf = np.memmap(path, mode="r")
    except OSError as e:
        raise GGUFError(f"{path}: file: cannot open ({e.strerror or e})") from e
    infos = _scan(path, buf)
    del buf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise GGUFError(f"{path}: gguf reader: {type(e).__name__}: {e}") from e
    if len(reader.tensors) != len(infos):
        raise GGUFError(f"{path}: tensor table: reader found {len(reader.tensors)} tensors, expected {len(infos)}")
    for tensor, (field, _, n_bytes) in zip(reader.tensors, infos):
        if tensor.data.nbytes != n_bytes:
            raise GGUFError(f"{path}: {field}: reader mapped {tensor.data.nbytes} bytes, expected {n_bytes}")
    return reader


def require_kv(reader: gguf.GGUFReader, key: str, kind):
    """The value of metadata `key` as a Python value of `kind` (int, float, str, bool or list[...] of one)."""
    path = reader.data.filename
    elem = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
    want = _KIND_TYPES.get(elem if elem is not None else kind)
    if want is None:
        raise ValueError(f"kind {kind!r} is not one of int, float, str, bool, list[int], list[float], "
                         "list[str], list[bool]")
    field = reader.get_field(key)
    if field is None:
        raise GGUFError(f"{path}: metadata '{key}': missing (a required key)")
    types = field.types
    if elem is None:
        ok, expected = len(types) == 1 and types[0] in want, _type_names(want)
    else:
        ok = types[:1] == [GGUFValueType.ARRAY] and (len(types) == 1 or types[1] in want)
        expected = f"ARRAY of {_type_names(want)}"
    if not ok:
        raise GGUFError(f"{path}: metadata '{key}': has type {_describe(types)}, expected {expected}")
    try:
        value = field.contents()
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: metadata '{key}': string is not valid UTF-8 ({e.reason})") from e
    if bool in (elem, kind) and any(v not in (0, 1) for v in _bool_bytes(field)):
        raise GGUFError(f"{path}: metadata '{key}': BOOL byte other than 0 or 1")
    if kind is float and not np.isfinite(value):
        raise GGUFError(f"{path}: metadata '{key}': non-finite value {value}")
    return value


def _describe(types) -> str:
    return " of ".join(t.name for t in types) if types else "none"


def _bool_bytes(field):
    return [int(field.parts[i].view(np.uint8)[0]) for i in field.data]
