#!/usr/bin/env bash
# One device call for issue 7's kernels (about 7 minutes on an H100): checks every kernel against
# numlab.ops.qmatvec on fresh random inputs, then times the kernels' tiling variants and the plain-XLA
# reference for the issue's shapes (MUL_MAT, MUL_MAT_ID, attention, lm_head), the copy bandwidth
# measured in the same process. Installs nothing; expects numlab's dependencies importable
# (PYTHONPATH set by the caller). A kernel that fails to compile is recorded and the run goes on.
#
#   OUT=/some/dir bash scripts/device_kernels.sh
#
# Writes $OUT/kernels.json (everything), $OUT/results/bench/{matvec,moe,kernel-check,quantize-x}.json and
# vs_ggml.png (also under results/bench/ here), $OUT/log.txt; prints a table of reference / ours / ggml times last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/numlab-device-kernels}"
mkdir -p "$OUT/results/bench" results/bench
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=1

timeout -k 10 400 python - "$OUT" <<'PY' 2>&1 | tee "$OUT/log.txt"
import json, os, shutil, sys, time, warnings
warnings.filterwarnings("ignore", category=DeprecationWarning)   # jax 0.11: Pallas Triton deprecation
START = time.perf_counter()
out_dir = sys.argv[1]

import jax
from numlab.bench import matvec as mv, moe as mb
from numlab.bench.codecs import copy_bandwidth
from numlab.io import atomic_write_json

def log(msg):
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)

def save(name, obj):
    path = os.path.join("results", "bench", f"{name}.json")
    atomic_write_json(path, obj)
    shutil.copy(path, os.path.join(out_dir, "results", "bench", f"{name}.json"))

def until(seconds):
    return START + seconds

log(f"devices {jax.devices()}, jax {jax.__version__}")
bw = copy_bandwidth(1 << 30, 20)
log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
everything = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "copy_bandwidth_bytes_per_s": bw}

def stage(name, obj):
    everything[name] = obj
    everything["elapsed_s"] = time.perf_counter() - START
    atomic_write_json(os.path.join(out_dir, "kernels.json"), everything)

# 1. The headline cases first (q4_k one token, q8_1 and f32, every variant), so a short run still
#    answers them; 2. every format x mode x token path against the reference, then quantize_x's
#    groups per program; 3. the other matvec shapes (reference and first variant each, then more
#    variants); 4. the MoE products.
cases = mv.default_cases()
head = mv.run(cases[:2], budget_s=until(75) - time.perf_counter(), copy_bw=bw, log=log)
stage("matvec", head)
checks = mv.check_all(jax.random.PRNGKey(7), until(125), log)
save("kernel-check", {"device": everything["device"], "jax_version": jax.__version__, "checks": checks})
stage("checks", checks)
qx = mv.quantize_x_sweep(log=log)
save("quantize-x", {"device": everything["device"], "jax_version": jax.__version__, "rows": qx})
stage("quantize_x", qx)
tail = mv.run(cases[2:], budget_s=until(290) - time.perf_counter(), copy_bw=bw, log=log)
matvec = dict(head, cases=head["cases"] + tail["cases"], elapsed_s=head["elapsed_s"] + tail["elapsed_s"])
save("matvec", matvec)
stage("matvec", matvec)
moe = mb.run(budget_s=until(380) - time.perf_counter(), copy_bw=bw, log=log)
save("moe", moe)
stage("moe", moe)

bad = [c for c in checks if c.get("ok") is False]
print(f"\nchecks: {sum(bool(c.get('ok')) for c in checks)} ok, {len(bad)} failed, "
      f"{sum('skipped_for_time' in c for c in checks)} skipped for time")
for c in bad:
    print(f"  FAILED {c['fmt']} act={c['act']} n={c['n']}: {c.get('max_err_over_scale', c.get('error', ''))}"[:300])
print(f"copy bandwidth {bw / 1e9:.0f} GB/s; times are device us per product (profiler), cold weights\n")
print(mv.table(matvec))
print(mv.table({"cases": moe["cases"]}))
from numlab.bench import plot
rows, untimed = plot.against_ggml([matvec, moe])
if rows:
    plot.plot_against_ggml(rows, "results/bench/vs_ggml.png", plot.title([matvec, moe]))
    shutil.copy("results/bench/vs_ggml.png", os.path.join(out_dir, "results", "bench", "vs_ggml.png"))
print(f"figure results/bench/vs_ggml.png; left out, routed path untimed: {untimed}")
print(f"\nelapsed {time.perf_counter() - START:.0f} s; wrote {out_dir}/kernels.json")
PY
status=${PIPESTATUS[0]}
echo "exit status $status"
exit "$status"
