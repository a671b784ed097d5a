"""The Pallas kernels of a product as compiled for sm_90, without a GPU: registers, stack, main-loop opcodes.

`triton_kernels` lowers a jitted function for CUDA on the CPU (jaxlib 0.10 embeds each kernel's Triton IR in
its custom call) and returns that IR as text; `compile_sm90` compiles it with pip's `triton` (the optional
extra `sass`; not the device XLA's bundled Triton, so counts can differ there) and disassembles it with the
cuobjdump that triton ships; `main_loop` counts the instructions of the largest backward branch by opcode.
"""
import collections
import dataclasses
import os
import re
import subprocess

import jax
import jax.numpy as jnp

from numlab import formats, kernels
from numlab.formats.qtensor import QTensor
from numlab.kernels import qmatmul as qm

SM90_REGISTERS = 65536          # 32-bit registers per multiprocessor
TRITON_CALL = "__gpu$xla.gpu.triton"
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Triton kernel of a lowered program: its name, launch options and Triton IR as text."""
    name: str
    num_warps: int
    num_stages: int
    ttir: str


def product(fmt: str, act: str, tokens: int, rows: int, cols: int, cfg: qm.Config):
    """(fn, abstract args) of kernels.qmatvec_fast under cfg on a [rows, cols] fmt matrix and [tokens, cols]
    float32 x, for triton_kernels."""
    w = jax.ShapeDtypeStruct((rows, formats.row_bytes(fmt, cols)), jnp.uint8)
    x = jax.ShapeDtypeStruct((tokens, cols), jnp.float32)
    return (lambda data, xs: kernels.qmatvec_fast(QTensor(data, fmt, (rows, cols)), xs, act, config=cfg)), (w, x)


def config_replacements(text: str) -> dict:
    """'rows=32,lane_sums=true' -> {"rows": 32, "lane_sums": True}, typed by qmatmul.Config's fields;
    ValueError naming a bad item and what is valid."""
    fields = {f.name: f.type for f in dataclasses.fields(qm.Config)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = fields[name]
        if kind in (bool, "bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{name}={value!r}: expected true or false")
            out[name] = value.lower() in ("true", "1")
        elif kind in (int, "int"):
            try:
                out[name] = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected an integer") from None
        else:
            out[name] = value
    return out


def _attr_int(attr) -> int:
    return int(str(attr).split(":")[0])


def triton_kernels(fn, *args) -> list[Kernel]:
    """The Triton kernels of jax.jit(fn)(*args) lowered for CUDA (args may be ShapeDtypeStructs), in program
    order. Needs a jaxlib that embeds the Triton IR at lowering time (0.10; 0.11 compiles it, with a GPU)."""
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    target = str(inner.attributes["call_target_name"]) if inner.name == "stablehlo.custom_call" else ""
                    if TRITON_CALL in target:
                        calls.append(inner)
                    walk(inner)

    walk(module.operation)
    kernels = []
    for call in calls:
        cfg = call.attributes["mhlo.backend_config"]
        context = ir.Context()
        triton.dialect.register_dialect(context)
        with context:
            text = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes).operation.get_asm(enable_debug_info=False)
        kernels.append(Kernel(str(cfg["name"]).strip('"'), _attr_int(cfg["num_warps"]), _attr_int(cfg["num_stages"]),
                              text))
    if not kernels:
        raise ValueError("the lowered program has no Triton kernel (is the product routed to a Pallas kernel?)")
    return kernels


def compile_sm90(kernel: Kernel, workdir: str) -> dict:
    """kernel compiled by pip's triton for sm_90 (no fused multiply-adds from fp fusion, as XLA compiles
    Pallas kernels): {"sass", "registers", "stack_bytes", "shared_bytes", "layout_conversions" (in the
    TTGIR: shared-memory trips where Triton changes a value's register layout)}; writes .ttir, .ttgir, .cubin,
    .sass there."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise RuntimeError("compiling for sm_90 needs pip's triton: pip install -e '.[sass]'") from e
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, kernel.name)
    with open(stem + ".ttir", "w") as f:
        f.write(kernel.ttir)
    compiled = triton.compile(stem + ".ttir", target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages,
                                       "enable_fp_fusion": False})
    with open(stem + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    with open(stem + ".ttgir", "w") as f:
        f.write(compiled.asm["ttgir"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", stem + ".cubin"], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", stem + ".cubin"], capture_output=True, text=True,
                           check=True).stdout
    with open(stem + ".sass", "w") as f:
        f.write(sass)

    def resource(key):
        found = re.search(rf"{key}:(\d+)", usage)
        return int(found.group(1)) if found else 0

    return {"sass": sass, "registers": resource("REG"), "stack_bytes": resource("STACK"),
            "shared_bytes": resource("SHARED"), "layout_conversions": compiled.asm["ttgir"].count("convert_layout")}


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without its predicate) of each instruction of a cuobjdump -sass listing."""
    return [(int(m.group(1), 16), _PREDICATE.sub("", m.group(2))) for m in map(_INSTRUCTION.match, sass.splitlines())
            if m]


def opcode(text: str) -> str:
    """An instruction's opcode without its modifiers ("IMAD.WIDE.U32 R2, ..." -> "IMAD")."""
    return text.split()[0].split(".")[0]


def main_loop(sass: str) -> tuple[int, dict]:
    """(instructions, counts by opcode, most first) of the largest backward branch's span: the main loop of a
    kernel with one. (0, {}) where no branch goes backward."""
    listing = instructions(sass)
    spans = [(int(m.group(1), 16), addr) for addr, text in listing
             if (m := re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", text)) and int(m.group(1), 16) < addr]
    if not spans:
        return 0, {}
    start, end = max(spans, key=lambda s: s[1] - s[0])
    body = [text for addr, text in listing if start <= addr <= end]
    return len(body), dict(collections.Counter(map(opcode, body)).most_common())


def programs_per_multiprocessor(registers: int, num_warps: int) -> int:
    """Programs of num_warps warps that the registers alone let one sm_90 multiprocessor hold (at most 32)."""
    return min(32, SM90_REGISTERS // max(1, registers * 32 * num_warps))
