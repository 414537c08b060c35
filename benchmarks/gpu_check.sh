#!/usr/bin/env bash
# Issue 11, part 3: the regularised step and the evaluation on one GPU, in under 5 minutes.
#
#   benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, from the repository root or anywhere
#   benchmarks/gpu_check.sh --smoke    # the same Python parts on the CPU at a tiny size (seconds): a script check
#
# Measures (each line of its own benchmark; ratios are printed by the benchmarks):
#   1. bench_step, ResNet-50, 224 px, batch 64, fp32: plain vs S-IB (and S-IB with sib.fast_bn)
#   2. the same in bf16 autocast + channels_last, the regularised step in bf16 too (--reg-precision amp),
#      and with the trainer's default (--reg-precision fp32: the double backward in float32)
#   3. bench_step, ViT-B/16, 224 px, batch 64, fp32: plain vs S-IB (math attention kernel)
#   4. bench_eval at 224 px (ResNet-50, 32 images): ours vs the Captum + pytorch-grad-cam + Quantus composition
# Goals (issue 11): S-IB step <= 3.0x plain in fp32; bf16 not slower than fp32; ours_speedup >= 3.
# Environment: PYTHON (default: .venv/bin/python if present, else python). Output: stdout, also saved to
# ${OUT:-/tmp}/gpu_check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
LOG=${OUT:-/tmp}/gpu_check.txt

if [[ "${1:-}" == "--smoke" ]]; then
  DEVICE=cpu
  R50=(--models resnet18 --image-size 32 --batch-size 4 --steps 1 --warmup 1 --threads 1)
  VIT=(--models vit_b_16 --image-size 32 --batch-size 2 --steps 1 --warmup 0 --threads 1)
  EVAL=(--model resnet18 --image-size 32 --images 4 --ig-steps 2 --steps 2 --repeats 1 --threads 1)
else
  DEVICE=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with --smoke on a CPU')"
  R50=(--models resnet50 --image-size 224 --batch-size 64 --steps 10 --warmup 3)
  VIT=(--models vit_b_16 --image-size 224 --batch-size 64 --steps 10 --warmup 3)
  EVAL=(--model resnet50 --image-size 224 --images 32 --ig-steps 8 --steps 8 --repeats 2)
fi

{
  echo "== gpu_check $(date -u +%FT%TZ) device=$DEVICE git=$(git rev-parse --short HEAD 2>/dev/null || echo -)"
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  echo "== 1. ResNet-50 fp32"
  "$PY" benchmarks/bench_step.py --device "$DEVICE" "${R50[@]}" --regularizers none sib sib+fastbn energy:cam
  echo "== 2a. ResNet-50 bf16 + channels_last, regularised step in bf16 (--reg-precision amp)"
  "$PY" benchmarks/bench_step.py --device "$DEVICE" "${R50[@]}" --precision bf16 --channels-last \
    --reg-precision amp --regularizers none sib sib+fastbn
  echo "== 2b. ResNet-50 bf16 + channels_last, regularised step in fp32 (the trainer's default)"
  "$PY" benchmarks/bench_step.py --device "$DEVICE" "${R50[@]}" --precision bf16 --channels-last \
    --regularizers none sib
  echo "== 3. ViT-B/16 fp32"
  "$PY" benchmarks/bench_step.py --device "$DEVICE" "${VIT[@]}" --regularizers none sib
  echo "== 4. evaluation pipeline, ours vs reference"
  "$PY" benchmarks/bench_eval.py --device "$DEVICE" "${EVAL[@]}"
} 2>&1 | tee "$LOG"
echo "saved: $LOG"
