"""In-kernel decoders of GGML weight blocks, read from the flat byte array of a QTensor.

Every format is read in chunks of 256 values (one q4_k/q5_k/q6_k super-block, eight q8_0 blocks),
each chunk as 8 groups of 32 values: group g holds chunk values 32g .. 32g + 31, the span of one
Q8_1 activation block. The groups come in two parts of four whose code bytes lie together in memory
(q4_k: the low nibbles of its four 32-byte runs are groups 0, 2, 4, 6, the high nibbles 1, 3, 5, 7),
so a part is loaded as one [rows, 4, 32] tensor of contiguous runs. All arithmetic is integer (exact)
except the fp16 fields, which are read bit for bit. Shapes are powers of two (Triton).
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

CHUNK = 256
GROUP = 32
GROUPS = CHUNK // GROUP
PARTS = 2
GROUPS_PER_PART = GROUPS // PARTS
CHUNK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210, "q8_0": 272}
_BIAS = {"q4_k": 0, "q5_k": 0, "q6_k": 32, "q8_0": 128}   # level + bias >= 0
WORD_FORMATS = ("q4_k", "q5_k", "q6_k", "q8_0")          # read as 32-bit words (q6_k: rows of whole words)
DOT_WORD_FORMATS = ("q4_k", "q5_k")                     # dot tiles read as 32-bit words
_QS_WORD = {"q4_k": 4, "q5_k": 12}                       # first code word of a block (q5_k: after qh)


@dataclasses.dataclass(frozen=True)
class Lanes:
    """Where a group's 32 values lie in the decoded tensors. runs=1: [R, G, 32], values last (Triton
    reads 16-byte vectors of 16-byte aligned formats, one thread holding 16 values of a group);
    runs=16: [16, R, G, 2], runs of two values first, for formats whose blocks are only 2-byte aligned
    (q6_k's 210 bytes, q8_0's 34): Triton's 2-byte vectors would otherwise spread a group over 16
    threads, each decoding the group's scales for two values; with the runs axis first and slowest it
    keeps whole groups in one thread. Per-group fields are [R, G, 1] or [1, R, G, 1]."""

    runs: int = 1

    @property
    def split(self) -> bool:
        return self.runs > 1

    def rows(self, base):
        """base int32 [R] as the row axis of a decoded tensor."""
        return base[None, :, None, None] if self.split else base[:, None, None]

    def groups(self, ns: int, s0: int = 0):
        """int32 group numbers s0 .. s0 + ns - 1 along the group axis."""
        return _iota((1, 1, ns, 1) if self.split else (1, ns, 1), 2 if self.split else 1) + s0

    def value(self):
        """int32 index 0..31 of each value within its group."""
        if not self.split:
            return _iota((1, 1, GROUP), 2)
        w = GROUP // self.runs
        return w * _iota((self.runs, 1, 1, 1), 0) + _iota((1, 1, 1, w), 3)

    @property
    def value_axes(self) -> tuple:
        return (0, 3) if self.split else (2,)

    @property
    def non_row_axes(self) -> tuple:
        return (0, 2, 3) if self.split else (1, 2)


STANDARD = Lanes(1)


@dataclasses.dataclass
class Groups:
    """Decoded groups of one part, for rows R and groups G, shaped as Lanes says ([R, G, 32] here):
    codes int32 [R, G, 32] = unit · level (unit 1, or 16 for high nibbles left in place by decode(...,
    scaled=True)), g int32 [1, G, 1] (group index in the chunk), d float32 [R, 1, 1] (q8_0: [R, G, 1]),
    isc int32 [R, G, 1] (integer scale; q6_k: of the group's first 16 values, isc2 of its last 16, else
    isc2 is None), dmin float32 [R, 1, 1] and imin int32 [R, G, 1] for formats with mins, else None;
    value int32 [1, 1, 32]: the index of each value within its group."""

    codes: jax.Array
    unit: int
    g: jax.Array
    d: jax.Array
    isc: jax.Array
    isc2: jax.Array | None
    dmin: jax.Array | None
    imin: jax.Array | None
    value: jax.Array

    def scale_of_values(self):
        """int32 integer scale of every value: per group, or per value where it changes mid-group."""
        if self.isc2 is None:
            return self.isc
        return jnp.where(self.value < GROUP // 2, self.isc, self.isc2)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _u8(ref, offsets):
    """Bytes of the flat uint8 ref at int32 offsets, as int32 0..255."""
    return ref[offsets].astype(jnp.int32)


def _f16(ref, offsets):
    """The little-endian fp16 field at byte offsets, as float32 (exact)."""
    bits = _u8(ref, offsets) | (_u8(ref, offsets + 1) << 8)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _i8(byte):
    """int32 0..255 read as a signed byte."""
    return byte - ((byte >> 7) << 8)


def group_index(fmt: str, part: int, s0: int, ns: int, lanes: Lanes = STANDARD):
    """int32: chunk group of groups s0 .. s0 + ns - 1 of `part` (as decode's Groups.g)."""
    return _GROUP_OF[fmt](lanes.groups(ns, s0), part)


_GROUP_OF = {
    "q4_k": lambda s, part: 2 * s + part,                     # run c = s: low nibbles 2c, high 2c + 1
    "q5_k": lambda s, part: 2 * s + part,
    "q6_k": lambda s, part: 4 * (s // 2) + s % 2 + 2 * part,  # low nibbles: quarters 0, 1; high: 2, 3
    "q8_0": lambda s, part: GROUPS_PER_PART * part + s,
}


def decode(fmt: str, ref, base, parts, s0: int, ns: int, scaled: bool = False, lanes: Lanes = STANDARD) -> list:
    """[Groups] of each part in `parts`: groups s0 .. s0 + ns - 1 of the chunks starting at byte
    offsets base int32 [R]. Bytes shared by the parts (q4_k's low and high nibbles) are loaded once.

    scaled: leave high nibbles in place (codes = 16 · level, one mask instead of a shift), for the
    float path, which folds the 1/16 into the scale exactly. Each decoder loads its codes last:
    Triton propagates the register layout of the last load of a chain first, so the [R, G, 32] code
    bytes, not a [R, G, 1] scale, fix the layout of the math."""
    b3 = lanes.rows(base)
    s = lanes.groups(ns, s0)
    i = lanes.value()
    g = [_GROUP_OF[fmt](s, p) for p in parts]
    return _DECODERS[fmt](ref, b3, s, i, g, parts, scaled)


def _nibble(byte, high: bool, scaled: bool):
    """Low nibble, or high nibble (scaled: kept in place, 16 · nibble) of int32 bytes 0..255."""
    if not high:
        return byte & 15
    return byte & 0xF0 if scaled else byte >> 4


def _unit(part: int, scaled: bool) -> int:
    return 16 if scaled and part == 1 else 1


def _kquant_scales(ref, b3, j):
    """q4_k / q5_k 6-bit scale and min of sub-block j int32 [1, G, 1] (12 packed bytes at offset 4)."""
    low = j < 4
    a = _u8(ref, b3 + 4 + jnp.where(low, j, j + 4))
    b = _u8(ref, b3 + 4 + jnp.where(low, j + 4, j - 4))
    c = _u8(ref, b3 + 4 + j)
    sc = jnp.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
    mn = jnp.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
    return sc, mn


def _q4_k(ref, b3, s, i, gs, parts, scaled):
    scales = [_kquant_scales(ref, b3, g) for g in gs]
    d, dmin = _f16(ref, b3), _f16(ref, b3 + 2)
    qs = _u8(ref, b3 + 16 + GROUP * s + i)                # run c = s: low nibbles g = 2c, high 2c + 1
    return [Groups(_nibble(qs, p == 1, scaled), _unit(p, scaled), g, d, sc, None, dmin, mn, i)
            for p, g, (sc, mn) in zip(parts, gs, scales)]


def _q5_k(ref, b3, s, i, gs, parts, scaled):
    scales = [_kquant_scales(ref, b3, g) for g in gs]
    d, dmin = _f16(ref, b3), _f16(ref, b3 + 2)
    qh = _u8(ref, b3 + 16 + i + 0 * s)                    # bit g of qh[i]: fifth bit of value 32g + i
    qs = _u8(ref, b3 + 48 + GROUP * s + i)
    out = []
    for p, g, (sc, mn) in zip(parts, gs, scales):
        unit = _unit(p, scaled)
        codes = _nibble(qs, p == 1, scaled) | ((qh >> g) & 1) * (16 * unit)
        out.append(Groups(codes, unit, g, d, sc, None, dmin, mn, i))
    return out


def _q6_k(ref, b3, s, i, gs, parts, scaled):
    h, j = s // 2, s % 2                                  # half of 128 values, 32-run within it
    scales = [(_i8(_u8(ref, b3 + 192 + 2 * g)),           # int8 scale of values 32g .. 32g + 15
               _i8(_u8(ref, b3 + 193 + 2 * g))) for g in gs]   # and of 32g + 16 .. 32g + 31
    d = _f16(ref, b3 + 208)
    qh = _u8(ref, b3 + 128 + GROUP * h + i)
    ql = _u8(ref, b3 + 64 * h + GROUP * j + i)            # low nibbles: quarters 0, 1; high: 2, 3
    out = []
    for p, g, (sc_a, sc_b) in zip(parts, gs, scales):
        unit = _unit(p, scaled)
        level = _nibble(ql, p == 1, scaled) | ((qh >> (2 * (j + 2 * p))) & 3) * (16 * unit)
        out.append(Groups(level - 32 * unit, unit, g, d, sc_a, sc_b, None, None, i))
    return out


def _q8_0(ref, b3, s, i, gs, parts, scaled):
    ds = [_f16(ref, b3 + 34 * g) for g in gs]
    return [Groups(_i8(_u8(ref, b3 + 34 * g + 2 + i)), 1, g, d, jnp.ones_like(d, jnp.int32), None, None, None, i)
            for g, d in zip(gs, ds)]


_DECODERS = {"q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k, "q8_0": _q8_0}


def codes_f32(fmt: str, grp: Groups):
    """float32 codes, exactly: the bits of 2^23 + (codes + bias) less 2^23 + bias (an integer or and
    a float subtract, cheaper on the GPU than an int-to-float conversion)."""
    b = _BIAS[fmt] * grp.unit
    return (lax.bitcast_convert_type((grp.codes + b) | 0x4B000000, jnp.float32)
            - jnp.float32((1 << 23) + b))


def dequantized(fmt: str, grp: Groups):
    """float32 [R, G, 32] weights exactly as numlab.formats dequantizes them: (d·sc)·q − dmin·m
    (k-quants; d·sc and (d·sc)·q are exact, as is the power-of-two 1/unit, so the value does not
    depend on rounding order or fused multiply-adds), q·d (q8_0)."""
    q = codes_f32(fmt, grp)
    if fmt == "q8_0":
        return q * grp.d
    w = (grp.d * grp.scale_of_values().astype(jnp.float32)) * jnp.float32(1 / grp.unit) * q
    if grp.dmin is not None:
        w = w - grp.dmin * grp.imin.astype(jnp.float32)
    return w


def _f16_bits(bits):
    """int32 holding fp16 bits in its low 16 -> float32 (exact)."""
    return lax.bitcast_convert_type((bits & 0xFFFF).astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def word_load(fmt: str, ref, wb, c4, m8):
    """The words of the q4_k / q5_k super-blocks at word offsets wb int32 [R, 1, 1] of the int32 ref:
    the four header words (d | dmin, the 12 scale bytes) [R, 1, 1] each, q5_k's fifth-bit words
    [R, 4, 8] (the same 8 for every run, loaded in the code words' shape: as [R, 1, 8] Triton converts
    their layout through shared memory, a barrier per chunk; else None) and the 32 code words [R, 4, 8]
    (c4 [1, 4, 1] and m8 [1, 1, 8] index runs and words; Config.lane_sums: [1, 4, 1, 1], [1, 1, 2, 4]
    and wb [R, 1, 1, 1]), loaded last: see decode."""
    head = [ref[wb + k] for k in range(4)]
    qh = ref[wb + 4 + m8 + 0 * c4] if fmt == "q5_k" else None
    return head, qh, ref[wb + _QS_WORD[fmt] + 8 * c4 + m8]


def word_groups(head, qh, qs, c4) -> list:
    """[Groups] of the low (groups 2c) and high (2c + 1) nibbles of word_load's words: codes int32
    [R, 4, 8] are code words (byte j of word (c, m): value 4m + j of its group, one level 0..31 per
    byte; q5_k's fifth bit from bit g of qh's byte), isc / imin int32 [R, 4, 1], d / dmin float32
    [R, 1, 1]."""
    d, dmin = _f16_bits(head[0]), _f16_bits(head[0] >> 16)
    out = []
    for part in range(PARTS):
        g = 2 * c4 + part
        sh = 8 * (g % 4)
        high = g >= 4
        sc = jnp.where(high, ((head[3] >> sh) & 15) | (((head[1] >> (sh + 6)) & 3) << 4), (head[1] >> sh) & 63)
        mn = jnp.where(high, ((head[3] >> (sh + 4)) & 15) | (((head[2] >> (sh + 6)) & 3) << 4), (head[2] >> sh) & 63)
        codes = (qs >> (4 * part)) & 0x0F0F0F0F
        if qh is not None:
            codes = codes | (((qh >> g) & 0x01010101) << 4)
        out.append(Groups(codes, 1, g, d, sc, None, dmin, mn, None))
    return out


def dot_word_load(fmt: str, ref, wb):
    """The words of the q4_k / q5_k super-blocks at word offsets wb int32 [R, 1, 1] of the int32 ref, as
    the dot tiles read them: the four header words [R, 1, 1] each, q5_k's fifth-bit words [R, 1, 8]
    (else None), then the 8 code words [R, 1, 8] of each run 0..3 (loaded last: see decode)."""
    m8 = _iota((1, 1, 8), 2)
    head = [ref[wb + k] for k in range(4)]
    qh = ref[wb + 4 + m8] if fmt == "q5_k" else None
    return head, qh, [ref[wb + _QS_WORD[fmt] + 8 * run + m8] for run in range(4)]


def dot_word_groups(head, qh, runs) -> list:
    """[Groups] of groups 0..7 of dot_word_load's words, one each: codes int8 [R, 1, 32], levels 0..31
    (value 4m + j from byte j of code word m, the bytes joined in registers: see _word_bytes), g int32
    [1, 1, 1], d / dmin float32 and isc / imin int32 [R, 1, 1]."""
    d, dmin = _f16_bits(head[0]), _f16_bits(head[0] >> 16)
    out = []
    for g in range(GROUPS):
        run, part = divmod(g, 2)
        sh = 8 * (g % 4)
        if g < 4:
            sc, mn = (head[1] >> sh) & 63, (head[2] >> sh) & 63
        else:
            sc = ((head[3] >> sh) & 15) | (((head[1] >> (sh + 6)) & 3) << 4)
            mn = ((head[3] >> (sh + 4)) & 15) | (((head[2] >> (sh + 6)) & 3) << 4)
        codes = (runs[run] >> (4 * part)) & 0x0F0F0F0F
        if qh is not None:
            codes = codes | (((qh >> g) & 0x01010101) << 4)
        out.append(Groups(_word_bytes(codes), 1, _iota((1, 1, 1), 0) + g, d, sc, None, dmin, mn, None))
    return out


def dot_word_mins(head):
    """The 6-bit mins of groups 0..7 from dot_word_load's header words, as bfloat16 [R, 32] (exact):
    column k holds group k % 8's (the left operand of the min term's dot, see qmatmul.min_planes)."""
    g = _iota((1, 1, GROUPS), 2)
    sh = 8 * (g % 4)
    mn = jnp.where(g < 4, (head[2] >> sh) & 63,
                   ((head[3] >> (sh + 4)) & 15) | (((head[2] >> (sh + 6)) & 3) << 4))      # [R, 1, 8]
    rows = mn.shape[0]
    return jnp.broadcast_to(mn, (rows, 4, GROUPS)).reshape(rows, 4 * GROUPS).astype(jnp.bfloat16)


def _word_bytes(words):
    """int32 words [R, 1, 8] of bytes 0..127 -> int8 [R, 1, 32], byte j of word m at 4m + j. Built by
    stacking on a last axis (Triton's join: the new axis stays in one thread's registers, each thread
    keeping its words' 16 bytes together), not by a broadcast over [R, 1, 8, 4], whose layout Triton
    spreads byte by byte over the threads."""
    b = [((words >> (8 * j)) & 255).astype(jnp.int8) for j in range(4)]
    pairs = jnp.stack([jnp.stack([b[0], b[2]], axis=-1), jnp.stack([b[1], b[3]], axis=-1)], axis=-1)
    return pairs.reshape(words.shape[0], 1, GROUP)                       # [m, k, j]: byte 2k + j


def halves(lo, hi):
    """int32 words 2 bytes on from lo: lo's high half, then hi's low half."""
    return ((lo >> 16) & 0xFFFF) | (hi << 16)


def q8_0_word_load(ref, wb, c4, m8):
    """The words of the q8_0 chunks at word offsets wb int32 [R, 1, 1] of the int32 ref, four pairs of
    34-byte blocks (17 words) each: a pair's words 0 and 8 [R, 4, 1] (the fp16 scales of its even block,
    low half, and odd block, high half), then words 0..7 and 1..8 (the even block's codes, two bytes
    into word 0) and 9..16 (the odd block's codes) [R, 4, 8], loaded last: see decode."""
    pair = wb + 17 * c4
    return ref[pair], ref[pair + 8], ref[pair + m8], ref[pair + 1 + m8], ref[pair + 9 + m8]


def q8_0_word_groups(first, ninth, lo, hi, odd, c4) -> list:
    """[Groups] of the even (groups 2c) and odd (2c + 1) blocks of q8_0_word_load's words: codes int32
    [R, 4, 8] are words of four signed codes (the even block's rebuilt from the high half of one word
    and the low half of the next), d float32 [R, 4, 1]; no integer scales or mins."""
    return [Groups(halves(lo, hi), 1, 2 * c4, _f16_bits(first), None, None, None, None, None),
            Groups(odd, 1, 2 * c4 + 1, _f16_bits(ninth >> 16), None, None, None, None, None)]


def q6_k_group(s, part):
    """Chunk group of run s (ql bytes 32s .. 32s + 31) and part (low, high nibbles) in q6_k's words."""
    return _GROUP_OF["q6_k"](s, part)


def q6_k_word_load(ref, wb, sh, rebuild: bool = False):
    """The words of the q6_k super-blocks at byte offsets 4·wb + sh of the int32 ref (wb int32 [R]), as
    [R, run s, half f, word k]. sh 0 or 2 for every row: ql's raw word 8s + 4f + k holds chunk bytes
    32s + 16f + 4k − sh ... + 3 (qh's likewise from byte 128), and the word after each half group's four
    comes too [R, 4, 2, 1]; rebuild (sh int32 [R], per row): each code word is rebuilt from two raw
    words to hold bytes 32s + 16f + 4k ... + 3 exactly, and no word after. Per part p (low, high
    nibbles): the signed 6-bit scales of the half groups [R, 4, 2, 1]; then d's word; the code words
    last (see decode): ql [R, 4, 2, 4], its words after, qh, its words after (qh's shared by runs 2h
    and 2h + 1)."""
    s, f, k = _iota((1, 4, 1, 1), 1), _iota((1, 1, 2, 1), 2), _iota((1, 1, 1, 4), 3)
    wb = wb[:, None, None, None]
    if rebuild:
        sh = sh[:, None, None, None]
    scales = []
    for p in range(PARTS):
        pos = sh + 2 * q6_k_group(s, p) + f                   # byte of the half group's scale
        word = ref[wb + 48 + (pos >> 2)]
        scales.append((word << (24 - 8 * (pos & 3))) >> 24)
    d_word = ref[wb + 52]
    ql, qh = wb + 8 * s + 4 * f, wb + 32 + 8 * (s // 2) + 4 * f
    if not rebuild:
        return scales, d_word, ref[ql + k], ref[ql + 4], ref[qh + k], ref[qh + 4]

    def exact(w):
        """Chunk bytes 4i .. 4i + 3 from raw words i and i + 1."""
        return jnp.where(sh > 0, halves(ref[w], ref[w + 1]), ref[w])
    return scales, d_word, exact(ql + k), None, exact(qh + k), None


def q6_k_word_groups(scales, d_word, ql, ql_next, qh, qh_next, sh) -> tuple:
    """d float32 [R, 1, 1, 1] and per part p the code words of groups g = 4·(s // 2) + s % 2 + 2p of
    q6_k_word_load's words: levels 0..63 per byte (unbiased), [R, 4, 2, 4] and the next word's
    [R, 4, 2, 1] (None where rebuilt), with the half groups' scales int32 [R, 4, 2, 1]."""
    s = _iota((1, 4, 1, 1), 1)
    out = []
    for p, sc in enumerate(scales):
        shift = 2 * (s % 2) + 4 * p
        codes = [None if q is None else ((q >> (4 * p)) & 0x0F0F0F0F) | (((h >> shift) & 0x03030303) << 4)
                 for q, h in ((ql, qh), (ql_next, qh_next))]
        out.append((*codes, sc))
    sh = sh if jnp.ndim(sh) == 0 else sh.reshape(-1, 1, 1, 1)
    return _f16_bits(d_word >> (8 * sh)), out
