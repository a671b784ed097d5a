"""Kernel tilings by problem size: rows and warps per program, tokens per tile, column splits.

Chosen from scripts/device_kernels.sh sweeps on an H100 (numlab/bench/matvec.py writes them); the
split rule keeps about four programs per multiprocessor so that enough loads are in flight.
"""
from numlab.kernels.qmatmul import CHUNK, MIN_DOT, Config

SMS = 132          # H100 SXM multiprocessors
WAVES = 4          # programs per multiprocessor to aim for


def tokens_per_tile(n_tokens: int) -> int:
    """1 for one token, the next power of two up to 8 for few, else 16 .. 64 (dot tiles)."""
    if n_tokens <= 1:
        return 1
    if n_tokens <= 8:
        return 1 << (n_tokens - 1).bit_length()
    return min(64, max(MIN_DOT, 1 << (n_tokens - 1).bit_length()))


def config_for(fmt: str, act: str, n_tokens: int, rows: int | None = None, cols: int | None = None) -> Config:
    """A Config for n_tokens activation rows against a [rows, cols] matrix of format fmt."""
    tokens = tokens_per_tile(n_tokens)
    if tokens >= MIN_DOT:
        return Config(rows=64, tokens=tokens, num_warps=4)
    cfg = Config(rows=32, tokens=tokens, num_warps=8)
    if rows is None or cols is None:
        return cfg
    programs = max(1, rows // cfg.rows) * max(1, -(-n_tokens // tokens))
    ksplit = max(1, min(cols // CHUNK // 2, -(-SMS * WAVES // programs)))
    return Config(rows=cfg.rows, tokens=tokens, ksplit=ksplit, num_warps=cfg.num_warps)
