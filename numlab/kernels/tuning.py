"""Kernel tilings by problem size: rows and warps per program, tokens per tile, column splits.

First guesses from the compiled code (instructions per weight, registers, spills with Triton for
sm_90), to be replaced by the fastest variants of scripts/device_kernels.sh on an H100
(results/bench/matvec.json, moe.json). Integer modes use tensor-core int8 dots from 2 tokens on
(tiles of 16+ tokens, padded); float modes keep multiply-adds up to 8 tokens, whose exact float32 dot
tiles cost about one multiply-add per product. Column splits keep about four programs per
multiprocessor so that enough loads are in flight.
"""
import dataclasses

from numlab.kernels.layouts import DOT_WORD_FORMATS, WORD_FORMATS
from numlab.kernels.qmatmul import CHUNK, FLOAT_ACTS, MIN_DOT, Config

SMS = 132          # H100 SXM multiprocessors
WAVES = 4          # programs per multiprocessor to aim for (8 for one token in float modes)
LONG_ROW = 32      # chunks of 256 columns from which one token's column splits aim at steady streaming


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def config_for(fmt: str, act: str, n_tokens: int, rows: int | None = None, cols: int | None = None,
               matrices: int = 1) -> Config:
    """A Config for n_tokens activation rows against a [rows, cols] matrix of format fmt (per matrix, where
    one launch multiplies `matrices` of them: a MoE layer's experts touched at one token). One token:
    4 warps (faster than 8 for every format on the H100, results/bench/matvec.json), 16 rows for
    integer modes, 32 for float; integer modes on the word formats keep byte dot products up to 4
    tokens (MUL_MAT_ID at 4 tokens per expert: 209 us against 252 us for 16-token byte dot tiles; with
    8 per expert, the 128-token prefill, the dot tiles were faster: 0.148 s against 0.161 s); q4_k and
    q5_k across several matrices up to 3 (their word dot tiles at a mean 4 per expert, whose counts
    spread over several 4-token tiles: 154.0 us against 165.6; at 3 per expert 151.9 against 144.1;
    one matrix at 4 tokens 47.2 against 41.8, results/bench/four-tokens-h100.json). One token,
    integer modes: every format loads the next two chunks ahead (unroll 2; q6_k on long rows four), in the
    column splits of _one_token_ksplit (results/bench/prefetch-unrolled-h100.json; against no loads ahead
    in the same tiling, results/bench/matvec.json: q4_k 4096×14336 19.4 against 27.1 us, q6_k 26.4
    against 58.0, q8_0 30.4 against 60.6); two splits add atomically into quantize_x's zeros in every
    integer mode (q4_k 4096×14336 18.7 us against 19.6 with the split-sum launch and 19.7 with XLA's
    zeros, q8_0 30.7 against 31.3; not at 512 tokens, 551.3 against 519.9;
    results/bench/atomic-splits-h100.json; q8_k 19.2 against 19.8, results/bench/fma-dot-tiles-h100.json).
    Float modes at one token: one value run per lane on every format (results/bench/float-lanes-h100.json:
    q8_0 4096×14336 44.3 us against 62.7 with 16 runs, 4096×2048 10.2 against 13.8; q6_k 49.0 against
    50.6, the Q6_K lm_head 221.4 against 226.2). Float modes at 2 to 8 tokens: 16 rows, 4 warps (q4_k
    4096×14336 at 8 tokens: 105.3 us against 263.8 with 32 rows and 8 warps; MUL_MAT_ID at 4 per expert
    293.3 against 647.5). Integer dot tiles: 64 rows, 4 warps, up to 64 tokens, q4_k / q5_k weights read
    as words (qmatmul.dot_words), column splits counting a MoE launch's matrices (q4_k · q8_1 4096×14336
    at 512 tokens, whole product: words 518.6 us at 64 × 64 in 2 splits against 586.5 on bytes,
    results/bench/matvec.json as of commit 101e0dd; words 642.7 at 64 × 128 and 592.2 at 128 × 64 with 8
    warps against 522.9 at 64 × 64 unsplit, bytes 567.4 at 64 × 128,
    results/bench/dot-words-h100-first-run.json; 8 tokens 47.1 against 52.0 on bytes; MUL_MAT_ID at 16
    tokens per expert, 256 tokens, 222.6 against 252.0, moe.json of 101e0dd; earlier sweep:
    results/bench/dot-tiles.json); three pipeline stages (that kernel on an H200: 431.8 us against 433.8
    with four and 452.3 with two, results/bench/f16-dot-tiles-h200.json)."""
    waves = WAVES
    if n_tokens <= 1:
        integer = act not in FLOAT_ACTS
        cfg = Config(rows=16 if integer else 32, tokens=1, num_warps=4, unroll=2 if integer else 1,
                     prefetch=integer, lane_runs=0 if integer else 1)
        waves = 2 * WAVES
    elif act in FLOAT_ACTS and n_tokens <= 8:
        cfg = Config(rows=16, tokens=_pow2_at_least(n_tokens), num_warps=4)
    elif act in FLOAT_ACTS:
        cfg = Config(rows=64, tokens=32, num_warps=8)
    elif fmt in WORD_FORMATS and n_tokens <= (3 if fmt in DOT_WORD_FORMATS and matrices > 1 else 4):
        cfg = Config(rows=32, tokens=_pow2_at_least(n_tokens), num_warps=4)
    else:
        cfg = Config(rows=64, tokens=min(max(MIN_DOT, _pow2_at_least(n_tokens)), 64), num_warps=4)
    if rows is None or cols is None:
        return cfg
    programs = max(1, rows // cfg.rows) * max(1, -(-n_tokens // cfg.tokens))
    chunks = cols // CHUNK
    if n_tokens <= 1 and act not in FLOAT_ACTS:
        unroll = 4 if fmt == "q6_k" and chunks >= LONG_ROW else cfg.unroll
        ksplit = _one_token_ksplit(programs * matrices, chunks, unroll, 2 if chunks < LONG_ROW else chunks)
        return dataclasses.replace(cfg, unroll=unroll, ksplit=ksplit, atomic=ksplit == 2)
    if cfg.tokens >= MIN_DOT and act not in FLOAT_ACTS:
        programs *= matrices
    return dataclasses.replace(cfg, ksplit=max(1, min(chunks // 2, -(-SMS * waves // programs))))


def _one_token_ksplit(programs: int, chunks: int, unroll: int, most: int) -> int:
    """Column splits at one token, integer modes (`unroll` chunks loaded ahead): the fewest that divide the row's
    chunks and give 6 chunks in flight per multiprocessor (programs · splits · unroll) on rows of LONG_ROW
    chunks or more, one on shorter rows (there the split sum's launch costs more than the splits gain), at most
    `most` (2 on short rows where the splits add atomically: 512×2048 q4_k 4.2 us against 4.9 at 4 splits,
    results/bench/atomic-splits-h100.json). On the H100 (whole product,
    results/bench/prefetch-unrolled-h100.json, then prefetch-unrolled-second-h100.json): 4096×14336 at 2 splits
    two chunks ahead q4_k 19.3 / 19.4 us against 23.1 unsplit and 20.8 at 7 splits one chunk ahead (the earlier
    tuning), 19.9 / 20.0 unsplit four ahead; q8_0 30.3 / 30.3 against 38.5, 32.0 and 32.2 / 32.0; q6_k unsplit
    four ahead 26.4 / 26.3 against 28.1 / 28.2 at 2 splits two ahead and 27.2 at 7 one ahead; rows of 2048
    columns unsplit two ahead: 4096 rows 6.3 / 6.3 against 8.0 / 8.1 at 2 splits and 7.0 / 7.1 at 8 one ahead,
    MUL_MAT_ID q4_k 6.7 / 6.7 against 8.5 at 4 one ahead, q6_k 8.2 / 8.3 against 11.3, the Q6_K lm_head 107.9 /
    107.6 against 114.4 one ahead and 143.3 four ahead."""
    target = (6 * SMS if chunks >= LONG_ROW else SMS) / (programs * unroll)
    if target <= 1:
        return 1
    fewest = next((d for d in range(1, chunks + 1) if chunks % d == 0 and d >= target), chunks)
    return fewest if fewest <= most else max(d for d in range(1, most + 1) if chunks % d == 0)


def pays(act: str, n_tokens: int) -> bool:
    """Whether the kernel beats XLA's dequantize-and-dot for n_tokens activation rows per matrix. On the
    H100 (results/bench/matvec.json, q4_k 4096×14336): integer modes at every n measured (1, 8, 512:
    1.6–11× faster); float modes at n = 1 and 8 (2.1×, 2.2×) but not at 512 (XLA's dot 3.2× faster)."""
    return act not in FLOAT_ACTS or n_tokens <= 8
