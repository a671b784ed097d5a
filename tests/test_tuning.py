"""numlab.kernels.tuning: every config it picks is valid and fits its problem; the one-token column
splits follow the rule its docstring states (the fewest splits dividing the row's chunks that give 6
chunks in flight per multiprocessor on long rows, one on shorter rows, there at most two in q8_1)."""
import itertools

import pytest

from numlab.kernels import qmatmul as qm
from numlab.kernels import tuning
from numlab.kernels.layouts import CHUNK

SHAPES = [(4096, 14336), (4096, 2048), (512, 2048), (151936, 2048), (768, 2048), (2048, 768), (256, 1024)]


@pytest.mark.parametrize("fmt,act,n", [(f, a, n) for f in ("q4_k", "q5_k", "q6_k", "q8_0")
                                       for a in qm.acts_for(f) for n in (1, 3, 8, 17, 64, 512)])
def test_configs_are_valid_and_fit(fmt, act, n):
    for (rows, cols), matrices in itertools.product(SHAPES, (1, 8)):
        cfg = tuning.config_for(fmt, act, n, rows, cols, matrices).check()
        fitted = qm.fit(cfg, rows, cols)
        assert rows % fitted.rows == 0 and (cols // CHUNK) % fitted.ksplit == 0, (rows, cols, fitted)
        assert fitted.ksplit >= 1 and fitted.tokens in (1, 2, 4, 8, 16, 32, 64, 128)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
def test_one_token_splits_fill_the_machine_with_the_fewest(fmt):
    for (rows, cols), matrices in itertools.product(SHAPES, (1, 8)):
        cfg = tuning.config_for(fmt, "q8_1", 1, rows, cols, matrices)
        programs, chunks = rows // cfg.rows * matrices, cols // CHUNK
        slots = 6 * tuning.SMS if chunks >= tuning.LONG_ROW else tuning.SMS
        k, u = cfg.ksplit, cfg.unroll
        assert chunks % k == 0 and cfg.prefetch and u == (4 if fmt == "q6_k" and chunks >= tuning.LONG_ROW else 2)
        capped = chunks < tuning.LONG_ROW and k == 2          # q8_1 on short rows: at most 2 splits (atomic adds)
        assert programs * k * u >= slots or k == chunks or capped
        assert all(chunks % d or programs * d * u < slots for d in range(1, k))
        assert k <= 2 or chunks >= tuning.LONG_ROW
        assert cfg.atomic == (k == 2)


def test_measured_picks():
    """The H100 timings the rule was read from (tuning's docstrings) pick these splits, and two splits of
    one token in integer modes add atomically (not at 512 tokens)."""
    picks = {("q4_k", 4096, 14336, 1): 2, ("q6_k", 4096, 14336, 1): 1, ("q8_0", 4096, 14336, 1): 2,
             ("q4_k", 4096, 2048, 1): 1, ("q4_k", 512, 2048, 1): 2, ("q6_k", 151936, 2048, 1): 1,
             ("q4_k", 768, 2048, 8): 1, ("q6_k", 2048, 768, 8): 1}
    got = {key: tuning.config_for(key[0], "q8_1", 1, key[1], key[2], key[3]).ksplit for key in picks}
    assert got == picks
    atomic = {(fmt, act, n): tuning.config_for(fmt, act, n, 4096, 14336).atomic
              for fmt, act, n in (("q4_k", "q8_1", 1), ("q8_0", "q8_0", 1), ("q4_k", "q8_k", 1), ("q4_k", "q8_1", 512))}
    assert atomic == {("q4_k", "q8_1", 1): True, ("q8_0", "q8_0", 1): True, ("q4_k", "q8_k", 1): True,
                      ("q4_k", "q8_1", 512): False}


def test_measured_dot_tiles():
    """The dot tiles read off the H100 sweeps (results/bench/matvec.json, dot-tiles.json): q4_k · q8_1 at
    512 tokens 64 × 64 on words; 64 tokens 64 × 64 at 8 splits; MUL_MAT_ID at 16 tokens per expert over
    128 experts unsplit (the launch's matrices fill the machine); other pairs keep 64 tokens at 512; at 4
    tokens per expert q4_k takes the dot tiles (not at 3, nor one matrix at 4), q6_k the byte dot
    products (results/bench/four-tokens-h100.json)."""
    def fitted(fmt, act, n, rows, cols, matrices=1):
        c = qm.fit(tuning.config_for(fmt, act, n, rows, cols, matrices), rows, cols)
        return c.rows, c.tokens, c.num_warps, c.ksplit
    assert fitted("q4_k", "q8_1", 512, 4096, 14336) == (64, 64, 4, 2)
    assert fitted("q4_k", "q8_1", 64, 4096, 14336) == (64, 64, 4, 8)
    assert fitted("q4_k", "q8_1", 16, 768, 2048, 128) == (64, 16, 4, 1)
    assert fitted("q6_k", "q8_1", 512, 4096, 14336)[:2] == (64, 64)
    assert fitted("q4_k", "q8_1", 4, 768, 2048, 128)[:2] == (64, 16)      # word dot tiles from 4 per expert
    assert fitted("q4_k", "q8_1", 3, 768, 2048, 128)[:2] == (32, 4)
    assert fitted("q4_k", "q8_1", 4, 4096, 14336)[:2] == (32, 4)
    assert fitted("q6_k", "q8_1", 4, 768, 2048, 128)[:2] == (32, 4)
    assert all(tuning.config_for(f, "f32", 1, 4096, 14336).lane_runs == 1 for f in ("q6_k", "q8_0"))
