#!/usr/bin/env bash
# The GPU checks and benchmarks of the engine, INT4 and training issues. Run from the repo root; logs and
# JSON results go to ${OUT:-gpu_results}/. A lent GPU comes with 15 minutes of device time in all, start-up
# included, so `all` is the one call to make: every target in under 9 minutes, the most important first,
# each stage under its own time limit so that one slow or broken stage cannot cost the others.
#   bash scripts/gpu_checks.sh all      # decode + int4 (one process), train, tests: ~8 minutes at most
#   bash scripts/gpu_checks.sh decode   # moonlight-16b-a3b decode, batch 1 and 16: bf16 vs HF generate on the
#                                       # same weights, then INT4 routed experts (targets 250 / 1000 tok/s, 1.4x)
#   bash scripts/gpu_checks.sh train    # moe-2b training step, batch 8 x 2048, fp32+autocast and bf16 weights, vs HF
#                                       # (target >= 2x, >= 30% MFU)
#   bash scripts/gpu_checks.sh tests    # the CUDA tests: CUDA-graph decode, Triton kernels, flash SDPA, training
#   bash scripts/gpu_checks.sh decode-compile  # bf16 decode with each CUDA graph capturing the compiled step
#   bash scripts/gpu_checks.sh int4-gemv-rows  # decode-compile at batch 16 with the INT4 GEMV for up to 128 rows
#   bash scripts/gpu_checks.sh train-compile   # moonlet's steps under torch.compile
#   bash scripts/gpu_checks.sh train-nopad     # moonlet's steps without padding v for flash SDPA (to compare)
#   bash scripts/gpu_checks.sh head-loss       # the fused, chunked LM head + loss vs unfused: time, peak memory
# MOONLET_GPU_SMOKE=1 runs the same commands on tiny shapes (CPU is fine): a check of this script itself
# (tests/test_gpu_checks.py). PYTHON picks the interpreter (default python3).
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
if [ "${MOONLET_GPU_SMOKE:-0}" = 1 ]; then
  decode_model=tiny batches=1,2 prompt=16 new=8 train_preset=tiny train_shape="--batch 2 --seq-len 32"
  head_shapes=64x32x320
else
  decode_model=moonlight-16b-a3b batches=1,16 prompt=256 new=128 train_preset=moe-2b train_shape="--batch 8 --seq-len 2048"
  head_shapes=16384x1024x32768,16384x1024x163840  # moe-2b's 8 x 2048 tokens, its vocab and K2's
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") \
  | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"

# stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $out/NAME.log
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/stages.txt"
  return "$rc"
}

decode() {  # one model build: HF generate and moonlet bf16 on the same weights, then moonlet with INT4 experts
  stage decode "$1" "$py" -m moonlet.cli bench decode --model "$decode_model" --dtype bf16 --batch "$batches" \
    --prompt-len "$prompt" --new-tokens "$new" --compare hf --quant none,int4 --repeats 2 --profile --json
}
train() {  # shellcheck disable=SC2086
  stage train "$1" "$py" -m moonlet.cli bench train --preset "$train_preset" $train_shape --steps 5 --warmup 2 --profile \
    --precision amp,bf16 --compare hf --json
}
tests() {
  stage tests "$1" "$py" -m pytest -q -k "cuda or triton or autocast" tests/test_engine.py tests/test_kernels.py \
    tests/test_max_logits.py tests/test_model.py tests/test_train.py
}

case "${1:-all}" in
  all)
    rc=0
    : > "$out/stages.txt"  # this run's stages only (single stages append)
    decode 250 || rc=1
    train 220 || rc=1
    tests 120 || rc=1
    cat "$out/stages.txt"
    exit $rc ;;
  decode) decode "${2:-580}" ;;
  train) train "${2:-580}" ;;
  tests) tests "${2:-580}" ;;
  decode-compile)  # the step's many small kernels fused (the first run: eager-step graphs at 16% of HBM roofline)
    stage decode_compile "${2:-330}" "$py" -m moonlet.cli bench decode --model "$decode_model" --dtype bf16 \
      --batch "$batches" --prompt-len "$prompt" --new-tokens "$new" --compile --quant none,int4 --repeats 2 --json ;;
  int4-gemv-rows)  # batch 16's 96 token-expert rows on the GEMV instead of the grouped GEMM's padded 16-row tiles
    MOONLET_W4A16_GEMV_MAX_ROWS=128 stage int4_gemv_rows "${2:-300}" "$py" -m moonlet.cli bench decode \
      --model "$decode_model" --dtype bf16 --batch "${batches#*,}" --prompt-len "$prompt" --new-tokens "$new" --compile \
      --quant none,int4 --repeats 2 --json ;;
  train-compile)  # the same step under torch.compile (compiling happens in the untimed warm-up)
    # shellcheck disable=SC2086
    stage train_compile 580 "$py" -m moonlet.cli bench train --preset "$train_preset" $train_shape --compile --json ;;
  train-nopad)  # MLA's v unpadded: SDPA's memory-efficient kernel instead of flash
    export MOONLET_SDPA_PAD_V=0  # shellcheck disable=SC2086
    stage train_nopad 580 "$py" -m moonlet.cli bench train --preset "$train_preset" $train_shape --json ;;
  head-loss)
    stage head_loss "${2:-120}" "$py" scripts/head_loss_bench.py --dtype bf16 --shapes "$head_shapes" ;;
  *) echo "usage: $0 all | decode|train|tests|decode-compile|int4-gemv-rows|head-loss [seconds] | train-compile|train-nopad" >&2
     exit 2 ;;
esac
