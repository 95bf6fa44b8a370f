#!/usr/bin/env bash
# GPU benchmark of dino_r50_4scale (random weights) at 800x1333, batch 1, for docs/benchmarks.md.
#
# Runs on a machine with torch + torchvision + onnx + onnxruntime + onnxscript + accelerate + timm + safetensors and
# NO project install (no pycocotools needed): from the repository root,
#     OUT=/some/dir bash scripts/gpu_bench.sh
# Writes $OUT/bench_*.txt (tables), $OUT/bench_*.json and $OUT/gpu_bench.log. Two timed steps keep the total under
# 4 minutes (110 s + 120 s + start-up): each step is cut by `timeout`, and finished rows are saved as they come.
set -u
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export DINO_EXT_CACHE="${DINO_EXT_CACHE:-/tmp/dino_ext}"
PY="${PYTHON:-python3}"
COMMON=(--recipe dino_r50_4scale --image-size 800 1333 --batch 1 --device cuda)

{
  echo "== environment"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnxruntime', o.__version__, o.get_available_providers())"

  # Step 1 includes the one-off JIT build of the ms_deform_attn CUDA kernel (dino.ops), which eager then uses.
  echo "== step 1: eager fp32 / bf16 / fp16, ONNX Runtime CUDA (if this onnxruntime build has it)"
  timeout 110 "$PY" -c "import sys, dino_cli; sys.exit(dino_cli.main())" bench "${COMMON[@]}" \
    --backends eager_fp32 eager_bf16 eager_fp16 ort_cuda \
    --warmup 5 --iters 30 --json "$OUT/bench_eager.json" --table "$OUT/bench_eager.txt"
  echo "step 1 exit code $? (124 = cut by timeout; finished rows are still in the files)"
  "$PY" -c "import dino.ops as o; print('ms_deform_attn CUDA kernel available:', o.kernel_available())" 2>&1 | tail -1

  # Compile times are in the 'setup s' column; the table/JSON are rewritten after every row.
  echo "== step 2: torch.compile, then AOTInductor"
  timeout 120 "$PY" -c "import sys, dino_cli; sys.exit(dino_cli.main())" bench "${COMMON[@]}" \
    --backends compile aoti --warmup 3 --iters 20 --json "$OUT/bench_compiled.json" --table "$OUT/bench_compiled.txt"
  echo "step 2 exit code $? (124 = cut by timeout; finished rows are still in the files)"
} 2>&1 | tee "$OUT/gpu_bench.log"
