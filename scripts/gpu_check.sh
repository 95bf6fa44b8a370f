#!/usr/bin/env bash
# One prepared GPU session (6 min wall by default, at most --budget seconds plus the last section's 10 s kill grace),
# in priority order:
#   1. build the ms_deform_attn kernel; its CUDA tests (bad-input test in its own process); the TensorRT plugin's
#      enqueue test (needs the TensorRT headers, see below);
#   1b. the official IDEA-Research/DINO code as a measured peer (scripts/official_peer.py; needs a checkout in
#      $DINO_OFFICIAL_ROOT, else its rows say they were skipped): its R50 4-scale training step and its eager fp32
#      forward at the shapes below, deformable attention routed to our re-creation of the original kernel (csrc/bench)
#      and to its own PyTorch path; its rows go first into the training and deployment tables (sections 2 and 3
#      append to them), and its converted init becomes the weights of sections 2 and 3 (same weights);
#   2. training step of dino_r50_4scale at the official shapes (2 images, 800x1333, 900 queries, denoising):
#      images/s and peak memory, fp32 and bf16 autocast, CUDA kernel and PyTorch path;
#   3. deployed inference of dino_r50_4scale at 800x1333, batch 1 and 8: eager fp32, the batch-1 fp16 candidates
#      (scripts/deploy_candidates.py: CUDA graph, torch.compile reduce-overhead, channels-last, static AOTInductor),
#      eager bf16, AOTInductor bf16 with the kernel, torch.compile bf16 (default and reduce-overhead): FPS, p90, setup
#      time, by-query difference from eager, speed-up over the official rows;
#   4. the kernel table (python -m dino.ops.bench), encoder and decoder shapes;
#   5. precision: float16 (the --fp16 deploy model) and bf16 autocast against float32 at 800x1333, query by query on
#      float32's query selection (scripts/precision_check.py), CUDA kernel and PyTorch path.
# Uses the machine's python3 (torch + torchvision + scipy; no project install, no onnx) with the repo on PYTHONPATH.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# GPU_CHECK_SECTIONS picks sections (default all: "build official tests train deploy kernel precision"; "build" is
# the kernel build, which the other sections use when it is there); 8 minutes of device time for the official
# side-by-side, the candidates and the kernel table (docs/benchmarks.md):
#   GPU_CHECK_SECTIONS="build official train deploy kernel" DEPLOY_ARGS="--batches 1" \
#     bash scripts/gpu_check.sh --budget 450
# DEPLOY_ARGS adds arguments to scripts/bench_deploy.py (e.g.
# "--backends eager_fp32 aoti_bf16 --batches 1").
#
# Everything lands in $OUT (default ./gpu_out), at most 8 files (what a GPU session hands back): summary.md (device,
# one line per section as it ends), gpu_check.log (all output), tests.log, train.md, deploy.md, kernel.md,
# precision.md, and json.tar (the tables' JSON, written to $OUT/json/ during the run). Tables are rewritten after every
# row, so cutting the script at any point keeps every finished row. Each section has its own time cap, further cut
# to what is left of the whole budget (default 360 s; --budget 450 when the session can afford 8 minutes); a section
# without time left is skipped with a note.
# --dry-run: every step on tiny shapes on the CPU (the CUDA tests then skip), to catch typos before a GPU session
# (caps x3, budget 1500 s: a shared 2-core CPU is slow to start torch; about a minute on an idle 16-core machine).
#
# TensorRT headers for the plugin test: $DINO_TRT_HEADERS (a folder holding <tag>/include), else
# ../shared/third_party/tensorrt-headers, else ./.trt-headers (a copy carried to the GPU machine, git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
BUDGET=${GPU_CHECK_BUDGET_S:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$BUDGET" ] && BUDGET=$([ "$DRY" -eq 1 ] && echo 1500 || echo 360)
OUT=${OUT:-gpu_out}
rm -rf "$OUT/json"  # every table section appends to the tables of this run only
mkdir -p "$OUT/json"
OUT=$(cd "$OUT" && pwd)
JSON=$OUT/json
PY=${PYTHON:-python3}
# The repository's export/ folder is installed as dino_export: a link under that name makes it importable without an
# install.
LINKS=$(mktemp -d)
ln -s "$PWD/export" "$LINKS/dino_export"
export PYTHONPATH=$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SECTIONS=" ${GPU_CHECK_SECTIONS:-build official tests train deploy kernel precision} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
export DINO_EXT_CACHE=${DINO_EXT_CACHE:-/tmp/dino_ext} MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${DINO_TRT_HEADERS:-}" ]; then
  for d in ../shared/third_party/tensorrt-headers .trt-headers; do
    [ -d "$d" ] && { export DINO_TRT_HEADERS=$PWD/$d; break; }
  done
fi
DRYFLAG=()
[ "$DRY" -eq 1 ] && DRYFLAG=(--dry-run)
T0=$(date +%s)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

SUMMARY=$OUT/summary.md
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" -eq 1 ] && echo ' (dry run)')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -1
  echo "TensorRT headers: ${DINO_TRT_HEADERS:-none found}"
  echo "official checkout: ${DINO_OFFICIAL_ROOT:-none (DINO_OFFICIAL_ROOT unset: official rows skipped)}"
  echo '```'
  echo
  echo "| section | exit code | seconds | note |"
  echo "|---|---|---|---|"
} > "$SUMMARY"
cat "$SUMMARY"

# section NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), appends its line to summary.md.
# A dry run on a small, busy CPU is slower than the GPU run in every section: its caps are tripled.
section() {
  local name=$1 cap=$2; shift 2
  [ "$DRY" -eq 1 ] && cap=$(( cap * 3 ))
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    echo "| $name | - | 0 | skipped: the ${BUDGET} s budget is spent |" >> "$SUMMARY"
    echo "== $name: skipped (budget spent)"
    return 0
  fi
  echo "== $name (cap ${cap} s, $(( $(date +%s) - T0 )) s elapsed)"
  local start=$(date +%s)
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="cut at the ${cap} s cap (finished rows are kept)"
  echo "| $name | $rc | $(( $(date +%s) - start )) | $note |" >> "$SUMMARY"
  echo "== $name: exit code $rc after $(( $(date +%s) - start )) s"
}

# 1. Kernel build, CUDA tests, plugin enqueue test.
# Dry run: no CUDA, so only the fallback is reported; on a GPU DINO_REQUIRE_KERNEL makes a failed build an error.
BUILD_PY="
import logging, sys, time; logging.basicConfig(level=logging.INFO)
t = time.perf_counter()
from dino.ops.kernel import load_kernel
print('kernel module:', load_kernel(), f'({time.perf_counter() - t:.0f} s)')"
# Builds that later sections need, in the background while the kernel builds and tests run (a GPU machine has 16
# cores; each build is one or two compiler processes): the plugin library and its driver for this GPU, and the
# benchmark-only baseline extension of the kernel table. A section that finds its build unfinished builds it itself.
export DINO_PLUGIN_BUILD_DIR=${DINO_PLUGIN_BUILD_DIR:-/tmp/dino_plugin}
BG_LOG=/tmp/gpu_check_background.$$.log
if [ "$DRY" -eq 0 ] && { want tests || want kernel || want official; }; then
  ( [ -n "${DINO_TRT_HEADERS:-}" ] && $PY -c "
import torch
from pathlib import Path
from dino.ops.plugin_build import HEADER_TAGS, build_driver_enqueue, build_plugin, find_include
root = Path('$DINO_PLUGIN_BUILD_DIR'); inc = find_include(HEADER_TAGS[0])
major, minor = torch.cuda.get_device_capability()
lib = build_plugin(inc, root / 'gpu' / 'libdino_trt_plugin.so', arch=f'{major}{minor}', obj_dir=root)
print('prebuilt', build_driver_enqueue(inc, lib, root / 'gpu' / 'libplugin_enqueue.so'))"
    $PY -c "from dino.ops.bench import load_baseline; print('prebuilt', load_baseline())" ) > "$BG_LOG" 2>&1 &
fi
PYTEST=($PY -m pytest -q -rfEs --tb=short -p no:cacheprovider)
[ "$DRY" -eq 1 ] || export DINO_REQUIRE_KERNEL=1
want build && section "kernel build" 240 $PY -c "$BUILD_PY"
if want tests; then
  section "CUDA tests" 150 "${PYTEST[@]}" -m cuda tests/test_ms_deform_attn_cuda.py -k "not bad_input" \
    2>&1 | tee -a "$OUT/tests.log"
  # The bad-input checks in their own process: a crash there must not hide the numeric results.
  section "CUDA bad-input test" 60 "${PYTEST[@]}" -m cuda tests/test_ms_deform_attn_cuda.py -k bad_input \
    2>&1 | tee -a "$OUT/tests.log"
  section "plugin enqueue test" 150 "${PYTEST[@]}" -m cuda tests/test_plugin.py 2>&1 | tee -a "$OUT/tests.log"
fi
unset DINO_REQUIRE_KERNEL

# 1b. The official code as a peer: first in the training and deployment tables. Its converted init (written when its
# shapes are the benchmarks', i.e. not in a dry run) is the weights of sections 2 and 3.
OFFICIAL_WEIGHTS=/tmp/gpu_check_official_init.$$.safetensors
want official && section "official peer" 180 $PY scripts/official_peer.py "${DRYFLAG[@]}" \
  --official-root "${DINO_OFFICIAL_ROOT:-}" --budget-s $(( DRY ? 450 : 150 )) --weights-out "$OFFICIAL_WEIGHTS" \
  --train-json "$JSON/train.json" --train-table "$OUT/train.md" \
  --deploy-json "$JSON/deploy.json" --deploy-table "$OUT/deploy.md"
WEIGHTS=()
[ -f "$OFFICIAL_WEIGHTS" ] && WEIGHTS=(--weights "$OFFICIAL_WEIGHTS")

# 5 first when asked for: short, and the figure the export's float16 tolerance rests on.
if want precision; then
  section "precision, kernel" 90 $PY scripts/precision_check.py "${DRYFLAG[@]}" \
    --json "$JSON/precision.json" --table "$OUT/precision.md"
  section "precision, PyTorch path" 90 env DINO_DISABLE_KERNEL=1 $PY scripts/precision_check.py "${DRYFLAG[@]}" \
    --append --json "$JSON/precision.json" --table "$OUT/precision.md"
fi

# 2. Training step: CUDA kernel, then the PyTorch path (DINO_DISABLE_KERNEL) appended to the same table.
if want train; then
  section "training step, kernel" 75 $PY scripts/bench_train_step.py "${DRYFLAG[@]}" "${WEIGHTS[@]}" \
    --append --json "$JSON/train.json" --table "$OUT/train.md"
  PT_PREC=(fp32 bf16)
  [ "$DRY" -eq 1 ] && PT_PREC=(fp32)
  section "training step, PyTorch path" 75 env DINO_DISABLE_KERNEL=1 $PY scripts/bench_train_step.py \
    "${DRYFLAG[@]}" "${WEIGHTS[@]}" --precisions "${PT_PREC[@]}" --append --json "$JSON/train.json" \
    --table "$OUT/train.md"
fi

# 3. Deployed inference; the script stops starting new backends 45 s before its cap.
if want deploy; then
  DEPLOY_CAP=240
  DEPLOY_LEFT=$(( BUDGET - ($(date +%s) - T0) ))
  DEPLOY_BUDGET=$(( (DRY ? 3 * DEPLOY_CAP : DEPLOY_CAP) < DEPLOY_LEFT ? (DRY ? 3 * DEPLOY_CAP : DEPLOY_CAP) \
    : DEPLOY_LEFT ))
  DEPLOY_BUDGET=$(( DEPLOY_BUDGET - 45 ))
  # shellcheck disable=SC2086 # DEPLOY_ARGS is a list of words
  section "deployed inference" $DEPLOY_CAP $PY scripts/bench_deploy.py "${DRYFLAG[@]}" --budget-s $DEPLOY_BUDGET \
    "${WEIGHTS[@]}" --append --json "$JSON/deploy.json" --table "$OUT/deploy.md" ${DEPLOY_ARGS:-}
fi

# 4. Kernel table.
want kernel && section "kernel table" 60 $PY -m dino.ops.bench "${DRYFLAG[@]}" --warmup 3 --reps 10 \
  --out "$OUT/kernel.md"

[ -f "$BG_LOG" ] && { echo "== background builds"; cat "$BG_LOG"; rm -f "$BG_LOG"; }
echo >> "$SUMMARY"
echo "total $(( $(date +%s) - T0 )) s" >> "$SUMMARY"
cat "$SUMMARY"
for f in train deploy kernel precision; do [ -f "$OUT/$f.md" ] && { echo; cat "$OUT/$f.md"; }; done
tar -cf "$OUT/json.tar" -C "$OUT" json && rm -r "$OUT/json"
rm -rf "$LINKS" "$OFFICIAL_WEIGHTS"
! grep -q "^| [^|]* | [1-9]" "$SUMMARY"
