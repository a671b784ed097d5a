"""numlab.bench.sass: the main-loop reader on generated listings, the kernels' Triton IR as lowered for CUDA
on this CPU, Config replacements, and the register-bound programs per multiprocessor."""
import collections
import dataclasses
import sys

import pytest
from hypothesis import given, settings, strategies as st

from numlab.bench import sass
from numlab.kernels import qmatmul as qm, tuning

OPCODES = ("IMAD.WIDE.U32", "LOP3.LUT", "FADD", "SHFL.BFLY", "LDG.E.128", "IDP.4A.S8.S8", "HADD2.F32")


def _listing(ops: list[str], predicated: list[bool], branches: dict[int, int]) -> str:
    """A cuobjdump -sass style listing, 16 bytes per instruction; branches maps an index to its target index."""
    lines = ["        Function : kernel", "        .headerflags    @\"EF_CUDA_SM90\""]
    for i, op in enumerate(ops):
        text = f"BRA 0x{16 * branches[i]:x}" if i in branches else f"{op} R{i % 7}, R{i % 5}, R{i % 3}"
        guard = "@!P1 " if predicated[i] else ""
        lines.append(f"        /*{16 * i:04x}*/               {guard}{text} ;   /* 0x{i:016x} */")
    return "\n".join(lines)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_main_loop_counts_the_widest_backward_branch(data):
    n = data.draw(st.integers(12, 60))
    ops = data.draw(st.lists(st.sampled_from(OPCODES), min_size=n, max_size=n))
    predicated = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    start = data.draw(st.integers(0, n - 6))
    end = data.draw(st.integers(start + 4, n - 2))
    inner = data.draw(st.integers(start + 1, end - 2))           # a nested, narrower loop closing at end - 1
    branches = {end: start, end - 1: inner, n - 1: n - 1}          # the last: a branch to itself (not backward)
    count, by_op = sass.main_loop(_listing(ops, predicated, branches))
    body = ["BRA" if i in branches else ops[i].split(".")[0] for i in range(start, end + 1)]
    assert count == end - start + 1
    assert by_op == dict(collections.Counter(body))
    assert list(by_op.values()) == sorted(by_op.values(), reverse=True)


def test_main_loop_without_backward_branch():
    ops = ["FADD"] * 5
    assert sass.main_loop(_listing(ops, [False] * 5, {4: 4})) == (0, {})


def test_instructions_strip_predicates_and_opcode_modifiers():
    listing = _listing(["IMAD.WIDE.U32", "LDG.E.128"], [True, False], {})
    got = sass.instructions(listing)
    assert [a for a, _ in got] == [0, 16]
    assert [sass.opcode(t) for _, t in got] == ["IMAD", "LDG"]
    assert got[0][1].startswith("IMAD.WIDE.U32 R0")


def test_triton_kernels_carry_the_config():
    rows, cols = 256, 2048
    tuned = qm.fit(tuning.config_for("q4_k", "q8_1", 1, rows, cols), rows, cols)
    laned = dataclasses.replace(tuned, lane_sums=True, num_warps=2)
    found = {}
    for name, cfg in (("tuned", tuned), ("laned", laned)):
        fn, args = sass.product("q4_k", "q8_1", 1, rows, cols, cfg)
        found[name] = sass.triton_kernels(fn, *args)
        assert [k.name for k in found[name]] == ["quantize_x_q8", "qmatmul_q4_k_q8_1"]
        product = found[name][1]
        assert (product.num_warps, product.num_stages) == (cfg.num_warps, cfg.num_stages)
        assert "tt.func" in product.ttir and "tt.load" in product.ttir
    assert found["tuned"][0].ttir == found["laned"][0].ttir       # x's quantization does not see the product's tiling
    assert found["tuned"][1].ttir != found["laned"][1].ttir


def test_triton_kernels_refuse_a_program_without_kernels():
    import jax.numpy as jnp
    with pytest.raises(ValueError, match="no Triton kernel"):
        sass.triton_kernels(lambda a: a + 1, jnp.zeros(3))


def test_config_replacements_are_typed_and_checked():
    assert sass.config_replacements("") == {}
    assert sass.config_replacements("rows=32, lane_sums=true,dot=bf16x6,prefetch=0") == {
        "rows": 32, "lane_sums": True, "dot": "bf16x6", "prefetch": False}
    for bad, msg in (("row=32", "FIELD one of rows, tokens"), ("rows", "FIELD=VALUE"), ("rows=3.5", "integer"),
                     ("atomic=yes", "true or false")):
        with pytest.raises(ValueError, match=msg):
            sass.config_replacements(bad)


def test_compile_without_triton_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[sass\]'"):
        sass.compile_sm90(sass.Kernel("k", 4, 3, "module {}"), str(tmp_path))


@pytest.mark.parametrize("registers, warps, programs", [(79, 4, 6), (184, 4, 2), (255, 4, 2), (128, 8, 2),
                                                        (16, 1, 32)])
def test_programs_per_multiprocessor(registers, warps, programs):
    assert sass.programs_per_multiprocessor(registers, warps) == programs
