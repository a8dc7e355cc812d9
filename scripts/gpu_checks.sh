#!/usr/bin/env bash
# The GPU checks and benchmarks of the engine, INT4 and training issues, in stages that each fit one
# 10-minute call of a lent GPU machine. Run from the repo root; JSON results go to ${OUT:-gpu_results}/.
#   bash scripts/gpu_checks.sh tests    # CUDA tests: CUDA-graph decode, Triton W4A16 kernels, INT4 model
#   bash scripts/gpu_checks.sh decode   # moonlight-16b-a3b bf16 decode, batch 1 and 16, vs HF generate
#   bash scripts/gpu_checks.sh int4     # the same shape with INT4 routed experts (target >= 1.4x bf16)
#   bash scripts/gpu_checks.sh train    # moe-2b training step, batch 8 x 2048, vs HF (target >= 2x, >= 30% MFU)
#   bash scripts/gpu_checks.sh train-compile   # the same moonlet steps under torch.compile
#   bash scripts/gpu_checks.sh train-nopad     # moonlet's steps without padding v for flash SDPA (to compare)
set -euo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

case "${1:-tests}" in
  tests)
    python3 -m pytest -q tests/test_engine.py tests/test_kernels.py tests/test_max_logits.py tests/test_int4_checkpoint.py \
        tests/test_model.py tests/test_optim.py "tests/test_train.py::test_cuda_bf16_autocast_training_learns_and_reports_mfu" \
        2>&1 | tee "$out/tests.log" ;;
  decode)
    python3 -m moonlet.cli bench decode --model moonlight-16b-a3b --dtype bf16 --batch 1,16 --prompt-len 256 \
        --new-tokens 128 --compare hf --json | tee "$out/decode_bf16.log" ;;
  int4)
    python3 -m moonlet.cli bench decode --model moonlight-16b-a3b --dtype bf16 --batch 1,16 --prompt-len 256 \
        --new-tokens 128 --json | tee "$out/decode_bf16_nohf.log"
    python3 -m moonlet.cli bench decode --model moonlight-16b-a3b --dtype bf16 --batch 1,16 --prompt-len 256 \
        --new-tokens 128 --quant int4 --json | tee "$out/decode_int4.log" ;;
  train)
    python3 -m moonlet.cli bench train --preset moe-2b --batch 8 --seq-len 2048 --compare hf --json \
        | tee "$out/train.log" ;;
  train-compile)  # the same step under torch.compile (compiling happens in the untimed warm-up)
    python3 -m moonlet.cli bench train --preset moe-2b --batch 8 --seq-len 2048 --compile --json \
        | tee "$out/train_compile.log" ;;
  train-nopad)  # MLA's v unpadded: SDPA's memory-efficient kernel instead of flash
    MOONLET_SDPA_PAD_V=0 python3 -m moonlet.cli bench train --preset moe-2b --batch 8 --seq-len 2048 --json \
        | tee "$out/train_nopad.log" ;;
  *) echo "usage: $0 tests|decode|int4|train|train-compile|train-nopad" >&2; exit 2 ;;
esac
