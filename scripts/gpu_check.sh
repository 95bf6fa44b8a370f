#!/usr/bin/env bash
# One GPU session for the deformable-attention kernel: build it, run its CUDA tests, run the benchmark.
# Uses the machine's python3 with the repo on PYTHONPATH (no project venv needed: dino.ops imports torch only).
# Everything lands in $OUT (default ./gpu_out): device.txt, build.log, pytest_cuda.log, bench.md, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DINO_REQUIRE_KERNEL=1
export DINO_EXT_CACHE=${DINO_EXT_CACHE:-/tmp/dino_ext} MAX_JOBS=${MAX_JOBS:-16}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  command -v nvcc && nvcc --version | tail -1; } 2>&1 | tee "$OUT/device.txt"

start=$(date +%s)
timeout 300 $PY -c "
import logging; logging.basicConfig(level=logging.INFO)
from dino.ops.kernel import load_kernel
print('kernel module:', load_kernel())" 2>&1 | tee "$OUT/build.log"
rc_build=${PIPESTATUS[0]}
echo "build rc=$rc_build seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/build.log"
[ "$rc_build" -eq 0 ] || { echo "kernel build failed"; tail -60 "$OUT/build.log"; exit 1; }

# Bad-input checks in their own process: a crash there must not hide the numeric results.
timeout 200 $PY -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_ms_deform_attn_cuda.py -k "not bad_input" \
  2>&1 | tee "$OUT/pytest_cuda.log"
rc_test=${PIPESTATUS[0]}
timeout 60 $PY -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_ms_deform_attn_cuda.py -k bad_input \
  2>&1 | tee -a "$OUT/pytest_cuda.log"
rc_test=$(( rc_test || PIPESTATUS[0] ))

timeout 150 $PY -m dino.ops.bench --out "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

echo "cuda tests rc=$rc_test, bench rc=$rc_bench"
[ "$rc_test" -eq 0 ] && [ "$rc_bench" -eq 0 ]
