"""ggml's CUDA backend as the peer: its `test-backend-ops perf` times for issue 7's shapes.

`scripts/device_peer.sh` builds ggml with CUDA on the device and runs the perf mode; `parse` reads
its console lines into records, `times` keys them like numlab.bench.matvec's cases, and `load`
reads them back from results/bench/peer.json. ggml's perf loop re-runs one weight tensor (its
packed bytes may stay in L2), with activations quantized to Q8_1 inside the timed graph.
"""
import functools
import json
import os
import re

PEER_JSON = os.path.join("results", "bench", "peer.json")
_LINE = re.compile(r"^\s*(MUL_MAT(?:_ID)?)\((.*)\):\s+(\d+) runs -\s+([\d.]+) us/run")
_PARAM = re.compile(r"(\w+)=(\[[^\]]*\]|[^,]*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse(text: str) -> list:
    """Records {op, fmt, rows, cols, n, us, runs, params} of the MUL_MAT / MUL_MAT_ID lines of
    test-backend-ops perf output (console format); unsupported and other ops' lines are left out."""
    records = []
    for line in _ANSI.sub("", text).splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        op, params, runs, us = m.groups()
        p = dict(_PARAM.findall(params))
        records.append({"op": op.lower(), "fmt": p["type_a"].lower(), "rows": int(p["m"]), "cols": int(p["k"]),
                        "n": int(p["n"]), "us": float(us), "runs": int(runs), "params": params})
    return records


def times(records: list) -> dict:
    """{(op, fmt, rows, cols, n): microseconds} of parsed records (numlab.bench.matvec's case keys)."""
    return {(r["op"], r["fmt"], r["rows"], r["cols"], r["n"]): r["us"] for r in records}


@functools.lru_cache(maxsize=None)
def load(path: str = PEER_JSON) -> dict:
    """times() of a peer.json written by scripts/device_peer.sh, or {} where there is none (read once
    per process)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return times(json.load(f)["records"])
