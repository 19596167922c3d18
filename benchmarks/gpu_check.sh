#!/usr/bin/env bash
# GPU check: the GPU paths of ibot-bench on one fresh Linux machine with an NVIDIA GPU, in
# about 8 minutes after the install, ending with one summary table (paste it into the README
# with the date and the GPU).
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: scratch folder (default /tmp/ibot-gpu-check)
#   WHEELS=DIR bash benchmarks/gpu_check.sh   # a machine with no package index (see below)
#
# Steps (each with its own time limit; a failed step is reported, the others still run):
#   1. install:   a venv (.venv-gpu) with ibot-bench[dev,gpu] (faiss-gpu). With WHEELS=DIR
#                 (a machine that has torch but no package index): ibot-bench goes into
#                 $PYTHON's own environment, its missing dependencies from the wheels in DIR
#                 (`pip download` them elsewhere); faiss is then whatever DIR holds
#   2. pretrain:  iBOT step benchmark, ViT-S/16, 2x224 + 10x96 crops, bf16, on the GPU
#   3. features:  feature-engine throughput vs the raw forward on the GPU, fp32 and bf16
#   4. knn:       kNN on the GPU against the CPU on the same features (must agree)
#   5. finetune:  20 fine-tuning steps of ViT-S/16, fp32 and bf16
#   6. quick:     `run --suite quick` (what `make run` does) on the GPU: the quick pretraining
#                 and every quick protocol on its teacher and its init
#   7. torchrun:  `run --suite full --profile tiny`, frozen protocols, 2 processes
#                 (nccl with >= 2 GPUs; with one GPU both ranks share it over gloo)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ibot-gpu-check}
PY=${PYTHON:-python3}
VENV=.venv-gpu
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
printf '| step | status | seconds | result |\n|---|---|---|---|\n' >"$SUMMARY"

step() {  # step NAME LIMIT_S PATTERN COMMAND...: run, log, add a table row (last line matching PATTERN)
  local name=$1 limit=$2 pattern=$3
  shift 3
  local start=$SECONDS status=ok
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || status="FAILED (exit $?)"
  local result
  result=$(grep -E "$pattern" "$OUT/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  printf '| %s | %s | %s | %s |\n' "$name" "$status" "$((SECONDS - start))" "$result" >>"$SUMMARY"
  tail -n 5 "$OUT/$name.log"
}

if [[ -n "${WHEELS:-}" ]]; then
  BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
  step install 300 "Successfully|ibot-bench" bash -c \
    "$BIN/python -m pip install -q --no-index --find-links '$WHEELS' 'setuptools>=68' wheel && \
     $BIN/python -m pip install -q --no-index --find-links '$WHEELS' --no-build-isolation -e . && \
     $BIN/ibot-bench version | head -n 3"
else
  BIN=$VENV/bin
  step install 900 "Successfully|ibot-bench" bash -c \
    "test -x $VENV/bin/python || $PY -m venv $VENV; $VENV/bin/pip install -q -e '.[dev,gpu]' && $VENV/bin/ibot-bench version | head -n 3"
fi
step gpu 60 "NVIDIA|GPU" "$BIN/python" -c \
  "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
step pretrain 120 "vit_small" "$BIN/python" benchmarks/pretrain.py --cases vit_small \
  --precisions bf16 --steps 5 --device cuda
step features 90 "ViT-S/16.*bf16" "$BIN/python" benchmarks/features.py \
  --precisions fp32,bf16 --images 512 --batch-size 128 --device cuda
step knn 90 "agree" "$BIN/python" benchmarks/knn_gpu_agreement.py
step finetune 90 "bf16" "$BIN/python" benchmarks/finetune.py --precisions fp32 bf16 \
  --steps 20 --batch 64 --device cuda
step quick 240 "done|skipped|failed" "$BIN/ibot-bench" run --suite quick \
  --output "$OUT/quick" --cache-dir "$OUT/cache-quick" --force
NPROC=$("$BIN/python" -c "import torch; print(max(2, torch.cuda.device_count()))" 2>/dev/null || echo 2)
step torchrun 120 "done|skipped|failed" bash -c \
  "$BIN/ibot-bench data synth $OUT/data --classes 4 --size 64 --train 200 --val 5 --overwrite && \
   $BIN/python -m torch.distributed.run --nproc_per_node=$NPROC -m ibot_bench.cli run --suite full --profile tiny \
     --tasks knn,linear,logreg,cluster,semi --data-root $OUT/data --encoder random:vit_small \
     --output $OUT/tiny --cache-dir $OUT/cache --force"

echo
echo "GPU check, $(date -u +%Y-%m-%d), $("$BIN/python" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
cat "$SUMMARY"
