#!/usr/bin/env bash
# ggml's CUDA backend as the peer of issue 7, measured on the device (nothing of ggml is committed,
# only its numbers). Two steps, so that the build (CPU) can overlap other work and the timing (GPU)
# runs alone:
#
#   bash scripts/device_peer.sh build path/to/ggml_python-0.0.45.tar.gz   # ~5 min on 16 cores
#   bash scripts/device_peer.sh perf                                       # ~1 min; writes results/bench/peer.json
#
# build: ggml from the sdist's vendored sources, GGML_CUDA=ON for sm_90 (flash attention off: not
# timed here), with test-backend-ops' perf list extended by Qwen3-30B-A3B's attention (4096×2048,
# 512×2048) and lm_head (151936×2048) shapes. perf: the MUL_MAT / MUL_MAT_ID cases of issue 7's
# table and those shapes, console output to $WORK/perf.txt, parsed by numlab.bench.peer; the ggml
# figures of results/bench/{matvec,moe}.json (scripts/device_kernels.sh) are refreshed from it.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/ggml-peer}"
mkdir -p "$WORK" results/bench
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
build)
  tar xzf "${2:?path to the ggml-python sdist}" -C "$WORK"
  src=$(echo "$WORK"/ggml_python-*/vendor/ggml)
  python3 - "$src/tests/test-backend-ops.cpp" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
head = "static std::vector<std::unique_ptr<test_case>> make_test_cases_perf() {\n    std::vector<std::unique_ptr<test_case>> test_cases;\n"
extra = """    for (int bs : {1, 8, 512}) {
        for (ggml_type t : {GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0}) {
            test_cases.emplace_back(new test_mul_mat(t, GGML_TYPE_F32, 4096, bs, 2048, {1, 1}, {1, 1}));
            test_cases.emplace_back(new test_mul_mat(t, GGML_TYPE_F32, 512, bs, 2048, {1, 1}, {1, 1}));
        }
        test_cases.emplace_back(new test_mul_mat(GGML_TYPE_Q6_K, GGML_TYPE_F32, 151936, bs, 2048, {1, 1}, {1, 1}));
    }
"""
if head not in text:
    sys.exit(f"{path}: make_test_cases_perf's opening not found; the perf list cannot be extended")
open(path, "w").write(text.replace(head, head + extra, 1))
PY
  cmake -S "$src" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_BUILD_TESTS=ON \
    -DGGML_BUILD_EXAMPLES=OFF > "$WORK/cmake.log"
  cmake --build "$WORK/build" --target test-backend-ops -j "${JOBS:-12}"
  ;;
perf)
  filter='^type_a=(q4_K|q5_K|q6_K|q8_0),type_b=f32,(m=(4096|512|151936),n=(1|8|512),k=(14336|2048),bs=\[1,1\]|n_mats=128,n_used=8,b=0,m=768,n=(1|8|64|256),k=2048$)'
  "$WORK/build/bin/test-backend-ops" perf -b CUDA0 -o MUL_MAT,MUL_MAT_ID -p "$filter" | tee "$WORK/perf.txt"
  python3 - "$WORK/perf.txt" <<'PY'
import datetime, json, os, subprocess, sys
from numlab.bench import matvec, peer
from numlab.io import atomic_write_json
records = peer.parse(open(sys.argv[1]).read())
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
atomic_write_json(peer.PEER_JSON, {
    "source": "ggml CUDA backend, test-backend-ops perf, built by scripts/device_peer.sh from the "
              "ggml-python 0.0.45 sdist (GGML_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=90)",
    "device": gpu, "date": datetime.date.today().isoformat(),
    "notes": "us: mean microseconds per product over >= 1 s of back-to-back graph runs on one weight "
             "tensor (L2 may hold it); activations quantized to Q8_1 inside the timed graph",
    "records": records})
print(f"{len(records)} records -> {peer.PEER_JSON}")
for name in ("matvec", "moe"):                  # this session's kernel timings, now against these figures
    path = f"results/bench/{name}.json"
    if os.path.exists(path):
        with open(path) as f:
            atomic_write_json(path, matvec.with_ggml(json.load(f)))
        print(f"ggml figures refreshed in {path}")
PY
  ;;
*)
  echo "usage: $0 build SDIST | perf" >&2
  exit 2
  ;;
esac
