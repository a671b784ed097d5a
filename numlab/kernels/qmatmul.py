"""Grouped quantized matrix products as one Pallas (Triton) kernel.

y[p, r] = sum_c W_e[r, c] · x[p, c] for activation rows p grouped in tiles of `tokens` rows, each
tile multiplying one weight matrix e of a stack (the experts of a MoE layer; a plain matrix is a
stack of one). A program computes `rows` outputs of one tile over a share of the columns, reading
the weights' GGML bytes once and decoding them in registers (numlab.kernels.layouts).

Activation modes, with the arithmetic of numlab.ops.qmatvec's reference (the same function up to
float rounding; the dequantized weights are bit-identical):
- f32 / bf16 / f16: x rounded to that dtype (outside the kernel), float32 products and sums with the
  exactly dequantized weights. One token per tile: elementwise multiply-adds; 16 or more: a dot (`Config.dot`).
- q8_1 / q8_0 / q8_k: x quantized before the kernel (by numlab.kernels.quantize_x, or numlab's codecs
  in XLA: `Config.x_kernel`); exact int32 dots of codes per group of 32 (tensor-core int8 dots for 16 or more
  tokens), then the reference's float scaling. For
  fewer than 16 tokens (`Config.words`), the weights are read as 32-bit words and the
  codes multiplied four at a time by the GPU's byte dot product (dp4a), as llama.cpp's MMVQ does.
  The dot tiles read q4_k / q5_k as words too, and take q8_1's min term of a chunk (Σ_g m_g · dx_g ·
  Σ codes_g) in one bfloat16 tensor-core dot of the exact 6-bit mins with three bfloat16 parts of
  x's factors (min_planes): float32 products and sums, as the per-group multiply-adds it replaces.
Accumulation is float32.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import numlab.formats as formats
from numlab.formats._common import f16_value
from numlab.formats import q8_k
from numlab.formats.q8_0 import scale_and_codes
from numlab.kernels import layouts, quantize_x
from numlab.kernels.layouts import CHUNK, GROUP, GROUPS
from numlab.ops.precision import rounded

FLOAT_ACTS = ("f32", "bf16", "f16")
INT_ACTS = {"q4_k": ("q8_k", "q8_1"), "q5_k": ("q8_k", "q8_1"), "q6_k": ("q8_k", "q8_1"),
            "q8_0": ("q8_1", "q8_0")}
DOTS = {"f32": (lax.Precision.HIGHEST, lax.Precision.HIGHEST),
        "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6}
_HI = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
MIN_DOT = 16  # Triton's smallest dot operand dimension
PARTS = tuple(range(layouts.PARTS))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one kernel launch. rows, tokens: powers of two (tokens >= 16 uses dots, then rows
    >= 16 too); ksplit programs share a row's columns (partial sums added after the kernel); unroll
    chunks of 256 columns per loop iteration; Triton's num_warps and num_stages; dot: the float dot
    for tokens >= 16 (f32 exact products, tf32x3 / bf16x6 split products on tensor cores); lane_runs:
    the value layout of the multiply-add paths (layouts.Lanes: 1 or 16; 0 picks 16 for the 2-byte
    aligned q6_k and q8_0, 1 otherwise); words: fewer than 16 tokens in an integer mode read 32-bit
    words and use byte dot products (uses_words), else bytes and float multiply-adds; 16 or more on
    q4_k / q5_k: the dot tiles read the weights as words (dot_words), else bytes; prefetch: those word
    kernels load the next `unroll` chunks before the arithmetic of the current ones; x_kernel: integer-mode
    activations quantized by one Pallas kernel (numlab.kernels.quantize_x), else by XLA (prepare);
    atomic: two column splits add their partial sums into zeros (atomic float32 adds: 0 + a + b is the
    same float in either order), no launch to sum them; at most two splits. The GPU's atomic adds flush
    subnormal sums to +0 (H100, results/bench/atomic-splits-h100.json): below 2^-126, not a rounding;
    lane_sums: the word kernels below 16 tokens keep float sums per code word (q8_0), per four words
    (q4_k / q5_k) or per half group (q6_k), the scales applied there, reduced across threads once at
    the store instead of per chunk (sums in another order: float rounding); float_words: one token in a float
    mode on the word formats reads the weights as words (float_words()), prefetch and unroll as the word kernels."""

    rows: int = 16
    tokens: int = 1
    ksplit: int = 1
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dot: str = "f32"
    lane_runs: int = 0
    words: bool = True
    prefetch: bool = False
    x_kernel: bool = True
    atomic: bool = False
    lane_sums: bool = False
    float_words: bool = False

    def check(self):
        for name in ("rows", "tokens"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Config.{name}={v} must be a power of two")
        if self.tokens >= MIN_DOT > self.rows:
            raise ValueError(f"Config.rows={self.rows} must be >= {MIN_DOT} when tokens={self.tokens} "
                             f">= {MIN_DOT} (dot tiles)")
        if self.dot not in DOTS:
            raise ValueError(f"Config.dot={self.dot!r}; valid: {', '.join(DOTS)}")
        if min(self.ksplit, self.unroll, self.num_warps, self.num_stages) < 1:
            raise ValueError(f"Config {self}: ksplit, unroll, num_warps, num_stages must be >= 1")
        if self.atomic and self.ksplit > 2:
            raise ValueError(f"Config.atomic with ksplit={self.ksplit}: atomic adds are order-independent for at "
                             f"most 2 column splits")
        if self.lane_runs not in (0, 1, 16):
            raise ValueError(f"Config.lane_runs={self.lane_runs}; valid: 0 (by format), 1, 16")
        return self

    def lanes(self, fmt: str) -> layouts.Lanes:
        """The value layout of the multiply-add paths for weights in fmt."""
        return layouts.Lanes(self.lane_runs or (16 if fmt in ("q6_k", "q8_0") else 1))


def acts_for(fmt: str) -> tuple:
    """Activation modes the kernels implement for weights in `fmt` (empty: format not handled)."""
    return FLOAT_ACTS + INT_ACTS[fmt] if fmt in INT_ACTS else ()


def supported(fmt: str, act: str, acc: str, cols: int) -> bool:
    """Whether a kernel computes qmatvec(fmt, act, acc) for rows of `cols` values."""
    return act in acts_for(fmt) and acc == "f32" and cols % CHUNK == 0


def fit(cfg: Config, rows: int, cols: int) -> Config:
    """cfg with rows, ksplit and unroll reduced until they divide the problem (and dot tiles of
    16+ tokens given up for 8-token multiply-add tiles where fewer than 16 rows divide it)."""
    r = cfg.rows
    while rows % r:
        r //= 2
    tokens = cfg.tokens if r >= MIN_DOT or cfg.tokens < MIN_DOT else 8
    chunks = cols // CHUNK
    ks = min(cfg.ksplit, chunks)
    while chunks % ks:
        ks -= 1
    un = min(cfg.unroll, chunks // ks)
    while (chunks // ks) % un:
        un -= 1
    return dataclasses.replace(cfg, rows=r, tokens=tokens, ksplit=ks, unroll=un)


def prepare(x, act: str):
    """Activation rows x float [P, K] -> the kernel's inputs for `act`: (x rounded, float32) for
    float modes; for integer modes the reference's codes from numlab's codec: codes int8 [P, K],
    scales float32 [P, K / 32] (q8_k: [P, K / 256]) and the sums of codes per 32 as int32 (q8_k) or
    times their scale, float32 (q8_1, q8_0: the factor of a group's min term). Every bf16/f16 value
    (x here, the fp16 scales of q8_1 and q8_0) is read back from its bits (`low_value`). Every mode takes
    the codec's scale and codes before its byte packing (one pass fewer than its bytes)."""
    if act in FLOAT_ACTS:
        return (rounded(x, act),)
    x = x.astype(jnp.float32)
    if act in ("q8_1", "q8_0"):
        d, q = scale_and_codes(x.reshape(x.shape[0], -1, GROUP))
        d = f16_value(d.astype(jnp.float16))
    else:
        d, q = q8_k.scale_and_codes(x.reshape(x.shape[0], -1, q8_k.BLOCK_SIZE))
    sums = q.reshape(x.shape[0], -1, GROUP).astype(jnp.int32).sum(-1, dtype=jnp.int32)
    return q.reshape(x.shape[0], -1).astype(jnp.int8), d, sums if act == "q8_k" else d * sums.astype(jnp.float32)


def kernel_inputs(x, fmt: str, act: str, cfg: Config, interpret: bool = False, zeros: int = 0) -> tuple:
    """prepare(x, act) for x float [N, cols], in the form the kernel for (fmt, act, cfg) reads: codes
    as 32-bit words of four (uses_words), as float32 (other multiply-add paths) or int8 (dot tiles);
    by quantize_x's kernels where cfg.x_kernel; dot tiles take the scales and sums
    group-major ([K / 32, N]: a tile's tokens contiguous, read two at a time). zeros > 0: float32
    [zeros] of zeros last (from quantize_x's launch where it runs, else from XLA)."""
    words = uses_words(fmt, act, cfg, x.shape[-1])
    fma = act not in FLOAT_ACTS and cfg.tokens < MIN_DOT and not words
    group_major = act not in FLOAT_ACTS and cfg.tokens >= MIN_DOT
    if act not in FLOAT_ACTS and cfg.x_kernel:
        quantize = quantize_x.q8_k_blocks if act == "q8_k" else quantize_x.q8_blocks
        xs = quantize(x, "words" if words else "f32" if fma else "int8", interpret=interpret,
                      group_major=group_major, zeros=zeros)
        return xs[:2] + (min_planes(xs[2]),) + xs[3:] if min_dot(fmt, act, cfg) else xs
    return _prepared(x, fmt, act, cfg, words, fma, group_major) + ((jnp.zeros((zeros,), jnp.float32),) if zeros else ())


def _prepared(x, fmt, act, cfg, words, fma, group_major):
    """kernel_inputs by prepare (XLA)."""
    xs = prepare(x, act)
    if words:
        return (lax.bitcast_convert_type(xs[0].reshape(xs[0].shape[0], -1, 4), jnp.int32),) + xs[1:]
    if fma:
        return (xs[0].astype(jnp.float32),) + xs[1:]
    if not group_major:
        return xs
    xs = (xs[0],) + tuple(a.T for a in xs[1:])
    return xs[:2] + (min_planes(xs[2]),) if min_dot(fmt, act, cfg) else xs


def min_planes(s):
    """x's per-group min factors s = dx · Σ codes, float32 [K / 32, N] group-major -> bfloat16
    [K / 256, 32, N]: per chunk, rows 8i + g hold part i of group g's (s = part 0 + part 1 + part 2
    exactly, each part s's next 8 significant bits, cut from the bits: XLA on the GPU may drop a
    float32 -> bfloat16 -> float32 round trip), rows 24..31 zero: the right operand of the min term's
    dot (_int_dot), whose products with the 6-bit mins are exact."""
    parts, rest = [], s.reshape(-1, GROUPS, s.shape[-1]).astype(jnp.float32)
    for _ in range(3):
        bits = lax.bitcast_convert_type(rest, jnp.uint32)
        parts.append(lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16))
        rest = rest - lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.stack(parts + [jnp.zeros_like(parts[0])], axis=1).reshape(-1, 4 * GROUPS, s.shape[-1])


def qmatmul(data, fmt: str, shape, x, tile_expert, act: str, cfg: Config, interpret: bool = False, src=None):
    """Grouped product: data uint8 [E, rows, row_bytes] (GGML rows of E matrices of `shape`), x float
    [N, cols] (activation rows, read in place: each is prepared once however many tiles use it), src
    which row tile row i multiplies: None (row i), an int k (row i // k) or int32 [T * tokens] (row
    src[i]; where negative, tile row i is undefined), tile_expert int32 [T] (matrix of each tile of
    cfg.tokens rows; negative: skip the tile, its outputs are undefined) -> float32 [T * tokens, rows]."""
    rows, cols = shape
    cfg = fit(cfg.check(), rows, cols)
    n_tiles = tile_expert.shape[0]
    per_row = src if isinstance(src, int) else 1
    indirect = src is not None and not isinstance(src, int)
    n_rows = src.shape[0] if indirect else x.shape[0] * per_row
    if (n_rows, x.shape[-1]) != (n_tiles * cfg.tokens, cols):
        raise ValueError(f"qmatmul: activations {x.shape}" + (f" by src {src.shape}" if indirect else
                                                               f", {per_row} tile rows each" if per_row > 1 else "")
                         + f" must be [tiles * tokens, cols] = [{n_tiles} * {cfg.tokens}, {cols}] for {cfg} "
                         f"(fitted to [{rows}, {cols}])")
    row_bytes = formats.row_bytes(fmt, cols)
    data = data.reshape(-1)
    if uses_words(fmt, act, cfg, cols) or dot_words(fmt, act, cfg) or float_words(fmt, act, cfg, cols):   # as words
        data = lax.bitcast_convert_type(data.reshape(-1, 4), jnp.int32)
    atomic = cfg.atomic and cfg.ksplit == 2
    n_out = n_tiles * cfg.tokens * rows
    xs = kernel_inputs(x, fmt, act, cfg, interpret, zeros=n_out if atomic else 0)
    zeros = (xs[-1].reshape(n_tiles * cfg.tokens, rows),) if atomic else ()   # the output the splits add into
    xs = xs[:len(xs) - len(zeros)]
    if indirect:
        xs = (src.astype(jnp.int32),) + xs
    dims = dict(cols=cols, row_bytes=row_bytes, expert_bytes=rows * row_bytes, n_x=x.shape[0])
    kernel = functools.partial(_kernel, fmt=fmt, act=act, cfg=cfg, interpret=interpret, indirect=indirect,
                               per_row=per_row, atomic=atomic, **dims)
    splits = () if atomic else (cfg.ksplit,)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(splits + (n_tiles * cfg.tokens, rows), jnp.float32),
        grid=(n_tiles, rows // cfg.rows, cfg.ksplit),
        in_specs=[pl.no_block_spec] * (2 + len(xs) + len(zeros)),
        out_specs=pl.BlockSpec((None,) * len(splits) + (cfg.tokens, cfg.rows),
                               lambda t, r, k: (k,) * len(splits) + (t, r)),
        input_output_aliases={2 + len(xs): 0} if atomic else {},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmatmul_{fmt}_{act}",
    )(tile_expert.astype(jnp.int32), data, *(a.reshape(-1) for a in xs), *zeros)
    return out if atomic else out[0] if cfg.ksplit == 1 else jnp.sum(out, axis=0)


def uses_words(fmt: str, act: str, cfg: Config, cols: int) -> bool:
    """Whether the kernel for (fmt, act, cfg) on rows of `cols` values reads 32-bit words with byte dot
    products (_int_words): q6_k's 210-byte super-blocks where a tile of rows is whole words."""
    return (cfg.words and act in INT_ACTS.get(fmt, ()) and cfg.tokens < MIN_DOT
            and _word_rows(fmt, cfg, cols))


def float_words(fmt: str, act: str, cfg: Config, cols: int) -> bool:
    """Whether the kernel for (fmt, act, cfg) on rows of `cols` values is _float_words: one token in a float
    mode, weights read as 32-bit words (Config.float_words)."""
    return cfg.float_words and act in FLOAT_ACTS and cfg.tokens == 1 and _word_rows(fmt, cfg, cols)


def _word_rows(fmt: str, cfg: Config, cols: int) -> bool:
    """Whether a tile of cfg.rows rows of fmt reads as 32-bit words: the word formats, q6_k's 210-byte
    super-blocks where its rows are whole words or the tile holds rows in pairs."""
    return fmt in layouts.WORD_FORMATS and (fmt != "q6_k" or cols % (2 * CHUNK) == 0 or cfg.rows % 2 == 0)


def dot_words(fmt: str, act: str, cfg: Config) -> bool:
    """Whether the dot tiles for (fmt, act, cfg) read the weights as 32-bit words (_int_dot_words)."""
    return cfg.words and cfg.tokens >= MIN_DOT and act in INT_ACTS.get(fmt, ()) and fmt in layouts.DOT_WORD_FORMATS


def min_dot(fmt: str, act: str, cfg: Config) -> bool:
    """Whether the word dot tiles for (fmt, act, cfg) take the q8_1 min term of a chunk in one
    tensor-core dot (mins [rows, 32] x min_planes [32, tokens]) rather than per group."""
    return act == "q8_1" and dot_words(fmt, act, cfg)


def _iota(shape, dim=0):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _drop(a):
    """[..., 1] -> [...] (a reshape: Triton has no slicing of register tensors)."""
    return a.reshape(a.shape[:-1])


class _Adding:
    """An output ref whose stores add to it atomically (Config.atomic)."""

    def __init__(self, ref):
        self.ref = ref

    def __setitem__(self, idx, value):
        index = jax.dtypes.canonicalize_dtype(int)      # Python ints as arrays (the discharge rule needs shapes)
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = tuple(jnp.asarray(i, index) if isinstance(i, int) else i for i in idx)
        plgpu.atomic_add(self.ref, idx, value)


def _kernel(te_ref, w_ref, *refs, fmt, act, cfg, interpret, cols, row_bytes, expert_bytes, n_x, indirect, per_row,
            atomic):
    *x_refs, o_ref = refs
    if atomic:                            # the last input is the zeros aliased to o_ref
        x_refs, o_ref = x_refs[:-1], _Adding(o_ref)
    t_id, r_id, k_id = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = te_ref[t_id]
    steps = cols // CHUNK // cfg.ksplit
    t0 = t_id * cfg.tokens
    if indirect:                          # tile row t multiplies activation row src[t0 + t]
        src_ref, *x_refs = x_refs
        def xrow(t):
            return jnp.maximum(src_ref[t0 + t], 0)
    else:
        def xrow(t):
            return (t0 + t) // per_row if per_row > 1 else t0 + t

    @pl.when(e >= 0)
    def _():
        rows = r_id * cfg.rows + _iota((cfg.rows,))
        base = e * expert_bytes + rows * row_bytes
        def chunk(c):
            """(byte offsets of chunk c of the tile's rows, c)."""
            return base + c * layouts.CHUNK_BYTES[fmt], c

        first = k_id * steps
        words, floats = uses_words(fmt, act, cfg, cols), float_words(fmt, act, cfg, cols)
        if words or floats or dot_words(fmt, act, cfg):
            if words:
                load, compute, acc, store = _int_words(fmt, cfg, cols, act, interpret)
            elif floats:
                load, compute, acc, store = (_float_words_q6_k(cfg, cols, interpret) if fmt == "q6_k"
                                             else _float_words(fmt, cfg, cols, interpret))
            else:
                load, compute, acc, store = _int_dot_words(fmt, cfg, cols, act, n_x, x_refs, xrow, interpret)
            if cfg.prefetch:                # the next `unroll` chunks' loads before these chunks' arithmetic
                def loads(it):
                    return tuple(load(w_ref, x_refs, *chunk(first + it * cfg.unroll + u), xrow)
                                 for u in range(cfg.unroll))

                def computed(acc, loaded):
                    for one in loaded:
                        acc = compute(one, acc)
                    return acc

                def ahead(it, carry):
                    acc, loaded = carry
                    following = loads(it + 1)
                    return computed(acc, loaded), following

                acc, loaded = lax.fori_loop(0, steps // cfg.unroll - 1, ahead, (acc, loads(0)))
                store(o_ref, computed(acc, loaded))
                return

            def step(w_ref, x_refs, b, c, xrow, acc):
                return compute(load(w_ref, x_refs, b, c, xrow), acc)
        elif act in FLOAT_ACTS:
            step, acc, store = (_float_fma(fmt, cfg, cols, interpret) if cfg.tokens < MIN_DOT
                                else _float_dot(fmt, cfg, cols))
        else:
            step, acc, store = (_int_fma(fmt, cfg, cols, act) if cfg.tokens < MIN_DOT
                                else _int_dot_bytes(fmt, cfg, cols, act, n_x, interpret))

        def body(it, acc):
            for u in range(cfg.unroll):
                acc = step(w_ref, x_refs, *chunk(first + it * cfg.unroll + u), xrow, acc)
            return acc

        store(o_ref, lax.fori_loop(0, steps // cfg.unroll, body, acc))


def _xpos(c, g, lanes):
    """Column of each value of the groups g in chunk c (shaped as lanes says)."""
    return c * CHUNK + GROUP * g + lanes.value()


def _store_rows(o_ref, acc):
    """One [rows] accumulator per token of the tile into the output block [tokens, rows]."""
    for t, a in enumerate(acc):
        o_ref[t, :] = a


def _float_fma(fmt, cfg, cols, interpret):
    """Fewer than 16 tokens: multiply-adds of the dequantized weights with x. One token: elementwise
    fused multiply-adds (_fma) per (row, group, value) carried across chunks and reduced at the end;
    several tokens: one [rows] sum per token, reduced per chunk."""
    g_n = layouts.GROUPS_PER_PART
    lanes = cfg.lanes(fmt)
    one = cfg.tokens == 1

    def step(w_ref, x_refs, base, c, xrow, acc):
        (x_ref,) = x_refs
        xs = [[x_ref[xrow(t) * cols + _xpos(c, layouts.group_index(fmt, p, 0, g_n, lanes), lanes)]
               for t in range(cfg.tokens)] for p in PARTS]                     # x first: see _kernel
        for p, grp in enumerate(layouts.decode(fmt, w_ref, base, PARTS, 0, g_n, True, lanes)):
            w = layouts.dequantized(fmt, grp)
            if one:
                acc = _fma(w, xs[p][0], acc, interpret)
            else:
                acc = tuple(a + jnp.sum(w * xv, axis=lanes.non_row_axes) for a, xv in zip(acc, xs[p]))
        return acc

    if one:
        def store(o_ref, acc):
            o_ref[0, :] = jnp.sum(acc, axis=lanes.non_row_axes)
        shape = (lanes.runs, cfg.rows, g_n, GROUP // lanes.runs) if lanes.split else (cfg.rows, g_n, GROUP)
        return step, jnp.zeros(shape, jnp.float32), store
    return step, tuple(jnp.zeros((cfg.rows,), jnp.float32) for _ in range(cfg.tokens)), _store_rows


def _float_words(fmt, cfg, cols, interpret):
    """One token in a float mode, weights read as words as the integer word kernels with lane_sums read them
    (q4_k / q5_k: a thread's four words of a run [R, 4, 2, 4]; q8_0: the words of four pairs of blocks
    [R, 4, 8]), each word's byte j dequantized as the reference (layouts.dequantized) and multiply-added
    (_fma) with x's value j of those words (loads smaller than a program's threads, so they take the words'
    layout) into float32 sums per word, reduced at the store. Returns (load, compute, accumulators, store)
    as _int_words."""
    if fmt == "q8_0":
        c4, m8 = _iota((1, 4, 1), 1), _iota((1, 1, 8), 2)
    else:
        c4, m8 = _iota((1, 4, 1, 1), 1), 4 * _iota((1, 1, 2, 1), 2) + _iota((1, 1, 1, 4), 3)
    wb_shape = (-1,) + (1,) * (c4.ndim - 1)

    def load(w_ref, x_refs, base, c, xrow):
        (x_ref,) = x_refs
        xs = [[x_ref[xrow(0) * cols + c * CHUNK + GROUP * (2 * c4 + part) + 4 * m8 + j] for j in range(4)]
              for part in PARTS]                                                   # x first: see _kernel
        wb = (base >> 2).reshape(wb_shape)
        return xs, (layouts.q8_0_word_load(w_ref, wb, c4, m8) if fmt == "q8_0"
                    else layouts.word_load(fmt, w_ref, wb, c4, m8))

    def byte(codes, j):
        """Code j of each word: signed (q8_0) or unsigned."""
        return (codes << (24 - 8 * j)) >> 24 if fmt == "q8_0" else (codes >> (8 * j)) & 0xFF

    def compute(loaded, acc):
        xs, words = loaded
        groups = layouts.q8_0_word_groups(*words, c4) if fmt == "q8_0" else layouts.word_groups(*words, c4)
        for x, grp in zip(xs, groups):
            for j in range(4):
                w = layouts.dequantized(fmt, dataclasses.replace(grp, codes=byte(grp.codes, j)))
                acc = _fma(w, x[j], acc, interpret)
        return acc

    def store(o_ref, acc):
        _store_rows(o_ref, [jnp.sum(acc, axis=tuple(range(1, acc.ndim)))])

    zeros = jnp.zeros(jnp.broadcast_shapes((cfg.rows,) + c4.shape[1:], m8.shape), jnp.float32)
    return load, compute, zeros, store


def _float_words_q6_k(cfg, cols, interpret):
    """_float_words on q6_k: the code words of q6_k_word_load [R, 4, 2, 4] (in odd chunks of rows of whole
    words 2 bytes early, with the word after each half group's four [R, 4, 2, 1]; else rebuilt), byte j of
    each dequantized as the reference and multiply-added with x's value there (zero where the byte lies
    outside its half group), into float32 sums per word and per word after."""
    s4, f2, k4 = _iota((1, 4, 1, 1), 1), _iota((1, 1, 2, 1), 2), _iota((1, 1, 1, 4), 3)
    whole_words = cols % (2 * CHUNK) == 0

    def load(w_ref, x_refs, base, c, xrow):
        (x_ref,) = x_refs
        sh_w = 2 * (c % 2) if whole_words else base & 3
        sh = sh_w if whole_words else 0                 # rebuilt words hold their half group's bytes exactly
        xs = []
        for p in PARTS:
            half = xrow(0) * cols + c * CHUNK + GROUP * layouts.q6_k_group(s4, p) + 16 * f2
            main = [jnp.where(4 * k4 + j >= sh, x_ref[jnp.maximum(half + 4 * k4 + j - sh, 0)], 0.0)
                    for j in range(4)]
            after = [jnp.where(j < sh, x_ref[half + 16 + j - sh], 0.0)     # even chunks (sh 0) are never a row's last
                     for j in range(2)] if whole_words else None
            xs.append((main, after))                                               # x first: see _kernel
        return xs, sh_w, layouts.q6_k_word_load(w_ref, base >> 2, sh_w, rebuild=not whole_words)

    def compute(loaded, acc):
        xs, sh, words = loaded
        d, parts = layouts.q6_k_word_groups(*words, sh)
        main_acc, after_acc = acc

        def add(words, j, sc, x, acc):
            """acc + the dequantized byte j of words (levels less their bias 32: signed codes) times x."""
            grp = layouts.Groups(((words >> (8 * j)) & 0xFF) - 32, 1, None, d, sc, None, None, None, None)
            return _fma(layouts.dequantized("q6_k", grp), x, acc, interpret)

        for (codes, after, sc), (x_main, x_after) in zip(parts, xs):
            for j, x in enumerate(x_main):
                main_acc = add(codes, j, sc, x, main_acc)
            for j, x in enumerate(x_after or ()):
                after_acc = add(after, j, sc, x, after_acc)
        return main_acc, after_acc

    def store(o_ref, acc):
        _store_rows(o_ref, [jnp.sum(acc[0], axis=(1, 2, 3)) + jnp.sum(acc[1], axis=(1, 2, 3))])

    zeros = (jnp.zeros((cfg.rows, 4, 2, 4), jnp.float32), jnp.zeros((cfg.rows, 4, 2, 1), jnp.float32))
    return load, compute, zeros, store


def _float_dot(fmt, cfg, cols):
    """16+ tokens: dots of the dequantized [rows, G·32] part with x [G·32, tokens]."""
    g_n = layouts.GROUPS_PER_PART
    prec = DOTS[cfg.dot]
    tok = _iota((1, 1, cfg.tokens), 2)

    def step(w_ref, x_refs, base, c, xrow, acc):
        (x_ref,) = x_refs
        for grp in layouts.decode(fmt, w_ref, base, PARTS, 0, g_n, scaled=True):
            w = layouts.dequantized(fmt, grp).reshape(cfg.rows, g_n * GROUP)
            pos = c * CHUNK + GROUP * grp.g.reshape(g_n, 1, 1) + _iota((1, GROUP, 1), 1)
            xv = x_ref[xrow(tok) * cols + pos].reshape(g_n * GROUP, cfg.tokens)
            acc = acc + jnp.dot(w, xv, precision=prec, preferred_element_type=jnp.float32)
        return acc

    def store(o_ref, acc):
        o_ref[...] = acc.T

    return step, jnp.zeros((cfg.rows, cfg.tokens), jnp.float32), store


def _chunk_scale(act, d, dmin, bi, bm, dxk):
    """Float scaling of one chunk's sums (see numlab.ops.qmatvec): q8_k: (d·dx)·isum − (dmin·dx)·msum
    from integer sums; q8_1 k-quants: d·Σ_g dx_g·isum_g − dmin·Σ_g m_g·(dx_g·xsum_g) from float sums
    (the reference rounds dx_g·(m_g·xsum_g): the min term differs by float rounding)."""
    if act == "q8_k":
        y = (d * dxk) * bi.astype(jnp.float32)
        return y if dmin is None else y - (dmin * dxk) * bm.astype(jnp.float32)
    y = d * bi
    return y if dmin is None else y - dmin * bm


def _int_fma(fmt, cfg, cols, act):
    """Fewer than 16 tokens, integer modes: the dots of the weight codes with x's codes per group,
    computed exactly with float32 multiply-adds (every product and partial sum is an integer below
    2^24; a high nibble's factor 16 comes off exactly), then the reference's float scaling."""
    g_n = layouts.GROUPS_PER_PART
    n_x32 = cols // GROUP
    lanes = cfg.lanes(fmt)

    def per_group(a):
        """A per-group field ([.., R, G, 1] or [1, 1, G, 1]) as [R, G] or [1, G]."""
        return a.reshape(-1, g_n)

    def group_dots(grp, q, xq):
        """[R, G] float32 integer dots, weighted by the integer scales (exact: q6_k's per-half scales
        go into the unscaled codes first, |scale · code · x code| · 32 < 2^24)."""
        if grp.isc2 is not None:
            return jnp.sum(q * grp.scale_of_values().astype(jnp.float32) * xq, axis=lanes.value_axes)
        dots = jnp.sum(q * xq, axis=lanes.value_axes) * jnp.float32(1 / grp.unit)
        return dots if fmt == "q8_0" else dots * per_group(grp.isc).astype(jnp.float32)

    def step(w_ref, x_refs, base, c, xrow, acc):
        xq_ref, dx_ref = x_refs[:2]
        toks = range(cfg.tokens)
        xqs = [[xq_ref[xrow(t) * cols + _xpos(c, layouts.group_index(fmt, p, 0, g_n, lanes), lanes)]
                for t in toks] for p in PARTS]                                   # x first: see _kernel
        acc, bi, bm = list(acc), [0] * cfg.tokens, [0] * cfg.tokens
        for p, grp in enumerate(layouts.decode(fmt, w_ref, base, PARTS, 0, g_n, fmt != "q6_k", lanes)):
            q = layouts.codes_f32(fmt, grp)
            for t in toks:
                dots = group_dots(grp, q, xqs[p][t])
                x32 = xrow(t) * n_x32 + c * GROUPS + per_group(grp.g)            # [1, G]
                if act == "q8_k":
                    bi[t] = bi[t] + jnp.sum(dots.astype(jnp.int32), axis=1)
                elif fmt == "q8_0":
                    acc[t] = acc[t] + jnp.sum((per_group(grp.d) * dx_ref[x32]) * dots, axis=1)
                else:
                    dx = dx_ref[x32]
                    bi[t] = bi[t] + jnp.sum(dx * dots, axis=1)
                if grp.imin is not None and act == "q8_k":
                    bm[t] = bm[t] + jnp.sum(per_group(grp.imin) * x_refs[2][x32], axis=1)      # int32
                elif grp.imin is not None:
                    bm[t] = bm[t] + jnp.sum(per_group(grp.imin).astype(jnp.float32) * x_refs[2][x32], axis=1)
        if fmt == "q8_0":
            return tuple(acc)
        d = grp.d.reshape(cfg.rows)
        dmin = None if grp.dmin is None else grp.dmin.reshape(cfg.rows)
        return tuple(a + _chunk_scale(act, d, dmin, bi[t], bm[t],
                                      dx_ref[xrow(t) * (cols // CHUNK) + c] if act == "q8_k" else None)
                     for t, a in enumerate(acc))

    zeros = tuple(jnp.zeros((cfg.rows,), jnp.float32) for _ in range(cfg.tokens))
    return step, zeros, _store_rows


def _small_int_f32(v):
    """int32 |v| < 2^22 -> float32 exactly: the bits of 1.5 · 2^23 + v less 1.5 · 2^23 (an integer add
    and a float subtract instead of a slow int-to-float conversion)."""
    return lax.bitcast_convert_type(v + 0x4B400000, jnp.float32) - jnp.float32(0x00C00000)


def _int_dot(fmt, cfg, cols, act, n_x, interpret):
    """16+ tokens, integer modes: per group an int8 dot [rows, 32] x [32, tokens] -> int32 (q6_k: one
    per half group, for its two scales), weighted by the integer scales exactly (int32 for q8_k, in
    float32 below 2^24 otherwise), then the reference's float scaling by fused multiply-adds (_fma);
    the min term goes into the accumulator per group. x's scales are group-major (kernel_inputs): n_x rows of x. Returns
    (accumulate, accumulators, store): accumulate(groups, x_refs, c, xrow, acc, mins) adds chunk c given
    its 8 decoded Groups (any order) and, where min_dot, its mins (layouts.dot_word_mins; x_refs[2] is
    then min_planes), else None."""
    def at(row, block):
        """Index of (activation row, block of the row) in x's group-major scales."""
        return block * n_x + row
    first_half = _iota((1, GROUP), 1) < GROUP // 2
    tok = _iota((1, cfg.tokens), 1)

    def idot(a, b):
        return jnp.dot(a.astype(jnp.int8), b, precision=_HI, preferred_element_type=jnp.int32)

    def scaled_dots(grp, xq):
        """[R, T] dots weighted by the integer scales: int32 (q8_k) or float32 (exact below 2^24)."""
        codes = grp.codes.reshape(cfg.rows, GROUP)
        if act == "q8_k":
            if grp.isc2 is None:
                return idot(codes, xq) if fmt == "q8_0" else _drop(grp.isc) * idot(codes, xq)
            return (_drop(grp.isc) * idot(jnp.where(first_half, codes, 0), xq)
                    + _drop(grp.isc2) * idot(jnp.where(first_half, 0, codes), xq))
        if fmt == "q8_0":
            return _small_int_f32(idot(codes, xq))
        if fmt == "q4_k":                   # |scale · dot| <= 63 · 32 · 15 · 127 < 2^22: one conversion
            return _small_int_f32(_drop(grp.isc) * idot(codes, xq))
        if grp.isc2 is None:
            return _drop(grp.isc).astype(jnp.float32) * _small_int_f32(idot(codes, xq))
        return (_drop(grp.isc).astype(jnp.float32) * _small_int_f32(idot(jnp.where(first_half, codes, 0), xq))
                + _drop(grp.isc2).astype(jnp.float32) * _small_int_f32(idot(jnp.where(first_half, 0, codes), xq)))

    def accumulate(groups, x_refs, c, xrow, acc, mins=None):
        xq_ref, dx_ref = x_refs[:2]
        bi = bm = 0 if act == "q8_k" else jnp.zeros((cfg.rows, cfg.tokens), jnp.float32)
        for grp in groups:
            g = grp.g.reshape(1, 1)
            xq = xq_ref[xrow(tok) * cols + c * CHUNK + GROUP * g + _iota((GROUP, 1))]       # [32, T]
            dots = scaled_dots(grp, xq)
            x32 = at(xrow(tok), c * GROUPS + g)                                              # [1, T]
            if act == "q8_k":
                bi = bi + dots
            elif fmt == "q8_0":
                acc = _fma(_drop(grp.d) * dx_ref[x32], dots, acc, interpret)
            else:
                bi = _fma(dx_ref[x32], dots, bi, interpret)
            if grp.imin is not None and act == "q8_k":
                bm = bm + _drop(grp.imin) * x_refs[2][x32]                                     # int32
            elif grp.imin is not None and mins is None:
                acc = _fma(-(_drop(grp.dmin) * _drop(grp.imin).astype(jnp.float32)), x_refs[2][x32], acc, interpret)
        if fmt == "q8_0":
            return acc
        if mins is not None:
            planes = x_refs[2][(c * 4 * GROUPS + _iota((4 * GROUPS, 1))) * n_x + xrow(tok)]   # [32, T]
            acc = _fma(-grp.dmin.reshape(cfg.rows, 1), jnp.dot(mins, planes, preferred_element_type=jnp.float32), acc,
                       interpret)
        if act == "q8_k":
            dmin = grp.dmin.reshape(cfg.rows, 1) if grp.dmin is not None else None
            return acc + _chunk_scale(act, grp.d.reshape(cfg.rows, 1), dmin, bi, bm, dx_ref[at(xrow(tok), c)])
        return _fma(grp.d.reshape(cfg.rows, 1), bi, acc, interpret)

    def store(o_ref, acc):
        o_ref[...] = acc.T

    return accumulate, jnp.zeros((cfg.rows, cfg.tokens), jnp.float32), store


def _int_dot_bytes(fmt, cfg, cols, act, n_x, interpret):
    """_int_dot on the weights' bytes, decoded group by group (layouts.decode): (step, accumulators,
    store)."""
    accumulate, zeros, store = _int_dot(fmt, cfg, cols, act, n_x, interpret)

    def step(w_ref, x_refs, base, c, xrow, acc):
        groups = (grp for s in range(layouts.GROUPS_PER_PART) for grp in layouts.decode(fmt, w_ref, base, PARTS, s, 1))
        return accumulate(groups, x_refs, c, xrow, acc)

    return step, zeros, store


def _int_dot_words(fmt, cfg, cols, act, n_x, x_refs, xrow, interpret):
    """_int_dot on q4_k / q5_k weights read as 32-bit words (layouts.dot_word_load: 36 or 44 words per
    row and chunk, few enough to hold a chunk ahead): (load, compute, accumulators, store) as
    _int_words's; x's codes are read in compute, where Triton pipelines them into the dots."""
    accumulate, zeros, store = _int_dot(fmt, cfg, cols, act, n_x, interpret)

    def load(w_ref, x_refs_, base, c, xrow_):
        return c, layouts.dot_word_load(fmt, w_ref, (base >> 2)[:, None, None])

    def compute(loaded, acc):
        c, words = loaded
        mins = layouts.dot_word_mins(words[0]) if min_dot(fmt, act, cfg) else None
        return accumulate(layouts.dot_word_groups(*words), x_refs, c, xrow, acc, mins)

    return load, compute, zeros, store


def _fma(a, b, c, interpret: bool):
    """a · b + c in float32, elementwise: rounded once on the GPU (PTX fma.rn.f32; Pallas' Triton path
    does not contract a multiply and an add), twice in Pallas' interpreter."""
    a, b, c = jnp.broadcast_arrays(a, b, c)
    if interpret:
        return a * b + c
    (out,) = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r",
                                          pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def _dp4a(a, b, interpret: bool):
    """int32 sum of the four products of the signed bytes of a and b, per element: PTX dp4a on the
    GPU, shifts and multiplies in Pallas' interpreter."""
    b = jnp.broadcast_to(b, a.shape)
    if interpret:
        return sum(((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24) for j in range(4))
    (out,) = plgpu.elementwise_inline_asm("dp4a.s32.s32 $0, $1, $2, 0;", args=[a, b], constraints="=r,r,r",
                                          pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return out


def _int_words(fmt, cfg, cols, act, interpret):
    """Fewer than 16 tokens, integer modes, weights read as 32-bit words: per chunk and row, the code
    words [R, 4, 8] give with x's code words the dots of groups 2c and 2c + 1 (q4_k / q5_k: low and
    high nibbles of run c; q8_0: the blocks of pair c) four codes per dp4a; q6_k: of its half groups
    from [R, 4, 2, 4 + 1] words, x's words shifted to meet them (see q6_k_x); then the reference's
    scaling (as _int_fma's), or Config.lane_sums' sums per word (see lane_sums). Returns
    (load, compute, accumulators, store): load(w_ref, x_refs, base, c, xrow) reads chunk c's words and
    x's, compute(loaded, acc) adds the chunk to the accumulators."""
    n_x32, n_w = cols // GROUP, cols // 4
    c4 = _iota((1, 4, 1), 1)
    m8 = _iota((1, 1, 8), 2)
    s4, f2, k4 = _iota((1, 4, 1, 1), 1), _iota((1, 1, 2, 1), 2), _iota((1, 1, 1, 4), 3)
    whole_words = cols % (2 * CHUNK) == 0       # q6_k rows of whole words: one shift per chunk
    toks = range(cfg.tokens)
    per_lane = cfg.lane_sums
    if per_lane and fmt in ("q4_k", "q5_k"):    # a run's words as [2, 4]: a thread's vector of four, summed in it
        c4, m8 = _iota((1, 4, 1, 1), 1), 4 * _iota((1, 1, 2, 1), 2) + _iota((1, 1, 1, 4), 3)

    def load(w_ref, x_refs, base, c, xrow):
        xq_ref, dx_ref = x_refs[:2]
        if fmt == "q6_k":                         # odd super-blocks start 2 bytes into a word
            sh = 2 * (c % 2) if whole_words else base & 3
            xs = [q6_k_x(xq_ref, xrow(t), c, sh > 0 if whole_words else None) for t in toks]   # x first
            dx = [dx_ref[xrow(t) * (cols // CHUNK) + c] if act == "q8_k" else
                  [dx_ref[xrow(t) * n_x32 + c * GROUPS + layouts.q6_k_group(s4, p)] for p in PARTS] for t in toks]
            return xs, dx, sh, layouts.q6_k_word_load(w_ref, base >> 2, sh, rebuild=not whole_words)
        xw = [[xq_ref[xrow(t) * n_w + c * (CHUNK // 4) + 16 * c4 + 8 * part + m8] for part in PARTS]
              for t in toks]                                                       # x first: see _kernel
        x32 = [[xrow(t) * n_x32 + c * GROUPS + 2 * c4 + part for part in PARTS] for t in toks]
        if act == "q8_k":
            dx = [dx_ref[xrow(t) * (cols // CHUNK) + c] for t in toks]
        else:
            dx = [[dx_ref[i] for i in row] for row in x32]
        wb = (base >> 2).reshape((-1,) + (1,) * (c4.ndim - 1))
        if fmt == "q8_0":
            return xw, dx, None, layouts.q8_0_word_load(w_ref, wb, c4, m8)
        mx = [[x_refs[2][i] for i in row] for row in x32]
        return xw, dx, mx, layouts.word_load(fmt, w_ref, wb, c4, m8)

    def q6_k_x(xq_ref, t, c, odd):
        """Row t's code words against q6_k_word_load's words of chunk c, per part: [1, 4, 2, 4] and the
        next word [1, 4, 2, 1] (in odd chunks shifted 2 bytes on; codes outside the half group zero;
        odd None: against rebuilt words, as they are and no next word), and the half groups' sums of
        codes [1, 4, 2, 1] (for the bias 32 of the levels)."""
        out = []
        for p in PARTS:
            w0 = t * n_w + c * (CHUNK // 4) + 8 * layouts.q6_k_group(s4, p) + 4 * f2
            own = xq_ref[w0 + k4]
            ones = jnp.full(own.shape, 0x01010101, jnp.int32)
            sums = jnp.sum(_dp4a(own, ones, interpret), axis=3, keepdims=True, dtype=jnp.int32)
            if odd is None:
                out.append((own, None, sums))
                continue
            before = jnp.where(k4 > 0, xq_ref[w0 + jnp.maximum(k4 - 1, 0)], 0)
            main = jnp.where(odd, layouts.halves(before, own), own)
            after = jnp.where(odd, layouts.halves(xq_ref[w0 + 3], 0), 0)
            out.append((main, after, sums))
        return out

    def q6_k_compute(loaded, acc):
        xs, dx, sh, words = loaded
        d, parts = layouts.q6_k_word_groups(*words, sh)
        out = []
        for t, a in enumerate(acc):
            bi = 0
            for p, ((codes, after, sc), (xm, xa, xsum)) in enumerate(zip(parts, xs[t])):
                dots = jnp.sum(_dp4a(codes, xm, interpret), axis=3, keepdims=True, dtype=jnp.int32) - 32 * xsum
                if after is not None:
                    dots = dots + _dp4a(after, xa, interpret)                         # [R, 4, 2, 1] half groups
                if per_lane:                      # Config.lane_sums: a float sum per half group
                    a = a + (d * (dx[t] if act == "q8_k" else dx[t][p]) * _small_int_f32(sc)) * _small_int_f32(dots)
                    continue
                isum = jnp.sum(sc * dots, axis=(2, 3), keepdims=True, dtype=jnp.int32)  # [R, 4, 1, 1] groups
                bi = bi + (jnp.sum(isum, axis=(1, 2, 3), dtype=jnp.int32) if act == "q8_k"
                           else jnp.sum(dx[t][p] * isum.astype(jnp.float32), axis=(1, 2, 3)))
            out.append(a if per_lane else
                       a + _chunk_scale(act, d.reshape(cfg.rows), None, bi, 0, dx[t] if act == "q8_k" else None))
        return tuple(out)

    def lane_sums(groups, xw, dx, mx, acc):
        """Config.lane_sums: one token's chunk added into float sums per code word (q8_0, acc [R, 4, 8]) or
        per four words (q4_k / q5_k, acc ([R, 4, 2, 1], the min term's [R, 4, 1, 1])), scaled per group."""
        if fmt == "q8_0":
            return acc + sum((grp.d * dx[p]) * _small_int_f32(_dp4a(grp.codes, xw[p], interpret))
                             for p, grp in enumerate(groups))
        dxs = [dx] * len(PARTS) if act == "q8_k" else dx          # q8_k: one x scale per chunk, integer group sums
        mxs = [dx * _small_int_f32(m) for m in mx] if act == "q8_k" else mx
        dots, mins = acc
        for grp, x, d, m in zip(groups, xw, dxs, mxs):
            isum = jnp.sum(_dp4a(grp.codes, x, interpret), axis=3, keepdims=True, dtype=jnp.int32)
            dots = dots + (grp.d * d * _small_int_f32(grp.isc)) * _small_int_f32(isum)
            mins = mins + (grp.dmin * _small_int_f32(grp.imin)) * m
        return dots, mins

    def lane_store(o_ref, acc):
        _store_rows(o_ref, [jnp.sum(a, axis=tuple(range(1, a.ndim))) if fmt in ("q8_0", "q6_k")
                            else jnp.sum(a[0], axis=(1, 2, 3)) - jnp.sum(a[1], axis=(1, 2, 3)) for a in acc])

    def compute(loaded, acc):
        if fmt == "q6_k":
            return q6_k_compute(loaded, acc)
        xw, dx, mx, words = loaded
        if fmt == "q8_0":
            groups = layouts.q8_0_word_groups(*words, c4)
            if per_lane:
                return tuple(lane_sums(groups, xw[t], dx[t], None, a) for t, a in enumerate(acc))
            return tuple(a + sum(jnp.sum((grp.d * dx[t][p]) * _small_int_f32(
                jnp.sum(_dp4a(grp.codes, xw[t][p], interpret), axis=2, keepdims=True, dtype=jnp.int32)), axis=(1, 2))
                for p, grp in enumerate(groups)) for t, a in enumerate(acc))
        groups = layouts.word_groups(*words, c4)
        if per_lane:
            return tuple(lane_sums(groups, xw[t], dx[t], mx[t], a) for t, a in enumerate(acc))
        bi, bm = [0] * cfg.tokens, [0] * cfg.tokens
        for t in toks:
            for p, grp in enumerate(groups):
                dots = jnp.sum(_dp4a(grp.codes, xw[t][p], interpret), axis=2, keepdims=True, dtype=jnp.int32)
                if act == "q8_k":
                    bi[t] = bi[t] + jnp.sum(grp.isc * dots, axis=(1, 2), dtype=jnp.int32)
                    bm[t] = bm[t] + jnp.sum(grp.imin * mx[t][p], axis=(1, 2), dtype=jnp.int32)
                else:
                    bi[t] = bi[t] + jnp.sum(dx[t][p] * _small_int_f32(grp.isc * dots), axis=(1, 2))
                    bm[t] = bm[t] + jnp.sum(_small_int_f32(grp.imin) * mx[t][p], axis=(1, 2))
        d, dmin = groups[0].d.reshape(cfg.rows), groups[0].dmin.reshape(cfg.rows)
        return tuple(a + _chunk_scale(act, d, dmin, bi[t], bm[t], dx[t] if act == "q8_k" else None)
                     for t, a in enumerate(acc))

    if not per_lane:
        return load, compute, tuple(jnp.zeros((cfg.rows,), jnp.float32) for _ in toks), _store_rows
    if fmt in ("q8_0", "q6_k"):
        zeros = jnp.zeros((cfg.rows, 4, 8) if fmt == "q8_0" else (cfg.rows, 4, 2, 1), jnp.float32)
    else:
        zeros = (jnp.zeros((cfg.rows, 4, 2, 1), jnp.float32), jnp.zeros((cfg.rows, 4, 1, 1), jnp.float32))
    return load, compute, (zeros,) * cfg.tokens, lane_store
