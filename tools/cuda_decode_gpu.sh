#!/usr/bin/env bash
# Decode-attention runs on a GPU machine: the op tests (tools/cuda_gpu.sh ops, then
# compute-sanitizer memcheck of the attention cases), the random Qwen3-0.6B bf16 checkpoint with
# its GGUF, decode timings of the key-split attention against the kernels before it
# (TESSERA_CUDA_DECODE_ATTN=0) at 1..256 sequences, tuning of its split count and rows in flight,
# the tensor-core form against the CUDA-core one, and bench/cuda_vs_llamacpp.sh against a llama.cpp
# CUDA build. Logs go to $OUT.
# Usage (there, from the checkout, carrying .gpu):
#   bash tools/cuda_decode_gpu.sh [steps...]
#   steps: ops memcheck mma ab tune prof stories e2e vs
# llama.cpp is not part of this repository: build it with CUDA by hand on that machine, outside
# the checkout, and give its bin/ directory as LLAMA_BIN (the `vs` step), with LLAMA_GGUF_PY
# naming a gguf-py directory (from its source) for writing the GGUF when the python `gguf`
# package is not installed.
# VS_BUDGET: seconds since the start after which the side-by-side run is skipped (default 330).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/cuda_decode_out}
mkdir -p "$LOG"
STEPS=${*:-ops memcheck ab prof vs}
want() { [[ " $STEPS " == *" $1 "* ]]; }
R=/tmp/tessera_gpu
T=$R/tessera
W=/tmp/tessera_vs
M=$W/qwen3-0.6b
LB=${LLAMA_BIN:-}
[ -n "${LLAMA_GGUF_PY:-}" ] && export PYTHONPATH=$LLAMA_GGUF_PY${PYTHONPATH:+:$PYTHONPATH}
status=0
SECONDS=0

# Unpacks the binaries (with wrappers that find their libraries) and runs test_cuda_ops.
if want ops; then bash tools/cuda_gpu.sh ops || status=1; else bash tools/cuda_gpu.sh none; fi
export TESSERA_SHARED=$R/shared

if want memcheck; then
  TESSERA_CUDA_OPS_ONLY=attention timeout 150 compute-sanitizer --tool memcheck \
    --error-exitcode 99 "$R/test_cuda_ops" >"$LOG/memcheck.txt" 2>&1
  rc=$?; tail -n 3 "$LOG/memcheck.txt"; echo "memcheck (attention cases) rc=$rc"
  [ "$rc" = 0 ] || status=1
fi

if ! want mma && { [ ! -f "$M/config.json" ] || [ ! -f "$W/qwen3-0.6b-bf16.gguf" ]; }; then
  python3 tools/gen_checkpoint.py qwen3-0.6b "$M" --dtype bf16 \
    --gguf "$W/qwen3-0.6b-bf16.gguf" --jobs 8 >"$W.gen.log" 2>&1 || { tail -5 "$W.gen.log"; status=1; }
fi

B=$LOG/bench.txt
if want mma; then # the tensor-core form against the CUDA-core one, in under a minute
  python3 tools/gen_checkpoint.py qwen3-0.6b "$M" --dtype bf16 \
    --jobs 16 >"$W.gen.log" 2>&1 &
  GEN=$!
  TESSERA_CUDA_OPS_ONLY=attention "$R/test_cuda_ops" >"$LOG/ops_attention.log" 2>&1
  echo "test_cuda_ops (attention) rc=$?"; tail -n 2 "$LOG/ops_attention.log"
  grep "CHECK failed" "$LOG/ops_attention.log" | head -5
  wait $GEN || tail -3 "$W.gen.log"
  for cfg in "256 1" "256 0" "128 1" "128 0" "64 1" "64 0"; do
    set -- $cfg
    [ $SECONDS -lt ${MMA_BUDGET:-48} ] || break
    TESSERA_CUDA_DECODE_MMA=$2 "$T" bench "$M" --device cuda --prompt-tokens 512 \
      --gen-tokens 32 --batch $1 --json 2>&1 | grep '^{' | sed "s/^/mma=$2 /" | tee -a "$B"
  done
  [ $SECONDS -lt ${MMA_BUDGET:-48} ] && python3 - <<'EOF2' 2>&1 | tee -a "$B"
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"copy bandwidth (read+write) {2 * 20 * x.numel() / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s")
EOF2
fi
if want ab; then
  echo "== decode: key-split attention (1) against the kernels before it (0) =="
  for b in 1 8 32 64 128 256; do
    g=32; [ $b = 1 ] && g=128
    for v in 1 0; do
      TESSERA_CUDA_DECODE_ATTN=$v "$T" bench "$M" --device cuda --prompt-tokens 512 \
        --gen-tokens $g --batch $b --json 2>&1 | sed "s/^/split=$v /" | tee -a "$B"
    done
  done
fi
if want tune; then # split counts and rows in flight, where the defaults may not be best
  for cfg in "256 0 4" "256 2 4" "256 3 4" "256 4 4" "256 0 8" "256 2 8" "256 4 8" "128 0 8" \
    "128 2 4" "64 0 8" "1 0 8" "1 0 4"; do
    set -- $cfg
    g=32; [ $1 = 1 ] && g=128
    TESSERA_CUDA_DECODE_SPLITS=$2 TESSERA_CUDA_DECODE_UNROLL=$3 "$T" bench "$M" --device cuda \
      --prompt-tokens 512 --gen-tokens $g --batch $1 --json 2>&1 | grep '^{' \
      | sed "s/^/splits=$2 unroll=$3 /" | tee -a "$B"
  done
fi
if want prof; then
  for b in 1 256; do # eager per-op timings (each op synchronised, ~10 us floor each)
    for v in 1 0; do
      TESSERA_CUDA_DECODE_ATTN=$v TESSERA_CUDA_STATS=2 "$T" bench "$M" --device cuda \
        --prompt-tokens 512 --gen-tokens 16 --batch $b 2>&1 | grep -E "cuda prof|decode_tok_s" \
        | sed "s/^/b=$b split=$v /" | tee -a "$B"
    done
  done
  TESSERA_CUDA_STATS=1 "$T" bench "$M" --device cuda --prompt-tokens 512 --gen-tokens 64 \
    --batch 1 2>&1 | grep -E "cuda stats|decode_tok_s" | sed "s/^/b=1 /" | tee -a "$B"
fi

if want stories; then bash tools/cuda_gpu.sh stories || status=1; fi

if want e2e; then
  E2E_ARGS=${E2E_ARGS:---graphs 1 --presets qwen3-0.6b} bash tools/cuda_gpu.sh e2e || status=1
fi

if want vs; then
  if [ -z "$LB" ] || [ ! -x "$LB/llama-batched-bench" ]; then
    echo "no llama.cpp build (LLAMA_BIN=${LB:-unset})"; status=1
  elif [ $SECONDS -gt "${VS_BUDGET:-330}" ]; then
    echo "side-by-side skipped: ${SECONDS}s spent"
  else
    bash bench/cuda_vs_llamacpp.sh "$LB" "$T" "$W" \
      2>&1 | grep -v "^ggml_cuda_init\|^  Device" | tee "$LOG/vs.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

echo "done in ${SECONDS}s, status $status"
exit $status
