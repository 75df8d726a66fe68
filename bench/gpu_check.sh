#!/usr/bin/env bash
# The GPU checks still open (bench/GPU_NOTES.md, "Open"), as one command for a
# machine with a CUDA GPU and PyTorch, Triton, transformers and pytest already
# installed. Run from the repository root; JSON and logs go to $OUT (default ./gpu-out).
#
#   bash bench/gpu_check.sh train   # ~250 s: bench/gpu.py train + trainer (one step
#                                   # timed alone and 5 back to back, transformers
#                                   # beside ours; then the `gpt2 train` loop itself),
#                                   # then the loop's variants (gpu_profile.py trainer:
#                                   # default, no clipping, clip_grad_norm_ first)
#   bash bench/gpu_check.sh loss    # ~160 s: the fused cross-entropy's tests on the GPU,
#                                   # the loss alone (compiled F.cross_entropy against the
#                                   # kernel's settings), then the loop with each loss
#   bash bench/gpu_check.sh fused   # ~480 s: the fused decode-attention kernel's
#                                   # tests on the GPU, then it against the default
#                                   # at batch 1 and batch 32 (gpu_profile.py)
#   bash bench/gpu_check.sh fused-b1  # ~310 s: the same at batch 1 only
#   bash bench/gpu_check.sh full    # ~420 s: bench/gpu.py decode + train (the
#                                   # headline figures), then the two loss variants
#
# Nothing is installed: the package is used from src/ through PYTHONPATH.
set -uo pipefail
case "${1:-}" in train|loss|fused|fused-b1|full) ;;
  *) echo "usage: bash bench/gpu_check.sh train|loss|fused|fused-b1|full" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"

case "$1" in
  train)
    # the pipelined loop on the GPU logs each step's own loss (a CPU run's)
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py \
      -k "pipelined_gpu_loop" 2>&1 | tee "$OUT/tests.log"
    timeout 240 "$PY" bench/gpu.py --sections train,trainer --no-train-tuned --out "$OUT" \
      2>&1 | tee "$OUT/train.log"
    mkdir -p "$OUT/loop"
    timeout 150 "$PY" bench/gpu_profile.py --sections trainer --budget-s 140 --out "$OUT/loop" \
      --trainer-variants default,no_clip,clip_grad_norm --trainer-profile default,no_clip \
      2>&1 | tee "$OUT/loop.log"
    ;;
  loss)
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      tests/test_train.py -k "cross_entropy or pipelined_gpu_loop or full_width" 2>&1 \
      | tee "$OUT/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: tests failed; not timing"; exit 1; }
    mkdir -p "$OUT/loss"
    timeout 170 "$PY" bench/gpu_profile.py --sections loss,trainer --budget-s 160 \
      --out "$OUT/loss" --trainer-variants default,compiled_loss 2>&1 | tee "$OUT/loss.log"
    ;;
  fused|fused-b1)
    # correctness first: a kernel that is wrong on the GPU must not be timed
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      "tests/test_fast_decode.py" -k "gpu_kernels or cuda" 2>&1 | tee "$OUT/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: tests failed; not timing"; exit 1; }
    mkdir -p "$OUT/b1" "$OUT/b32"
    timeout 160 "$PY" bench/gpu_profile.py --sections decode --budget-s 140 --out "$OUT/b1" \
      --decode-variants graph_one_row_tuned,graph_one_row_fused_tuned 2>&1 | tee "$OUT/b1.log"
    [ "$1" = fused-b1 ] && exit 0
    timeout 160 "$PY" bench/gpu_profile.py --sections decode --budget-s 140 --out "$OUT/b32" \
      --decode-batch 32 --decode-variants graph_compiled_layer_tuned,graph_compiled_layer_fused_tuned \
      2>&1 | tee "$OUT/b32.log"
    ;;
  full)
    timeout 300 "$PY" bench/gpu.py --sections decode,train --batches 1,32 --out "$OUT" \
      2>&1 | tee "$OUT/gpu.log"
    timeout 110 "$PY" bench/gpu_profile.py --sections train --budget-s 100 --out "$OUT" \
      --train-variants compiled_with_loss,compiled_sliced_loss 2>&1 | tee "$OUT/profile.log"
    ;;
esac
