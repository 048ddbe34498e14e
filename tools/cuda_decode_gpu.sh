#!/usr/bin/env bash
# Decode-attention runs on a GPU machine: the op tests (tools/cuda_gpu.sh ops, then
# compute-sanitizer memcheck of the attention cases), the random Qwen3-0.6B bf16 checkpoint with
# its GGUF, decode timings of the key-split attention against the kernels before it
# (TESSERA_CUDA_DECODE_ATTN=0) at 1..256 sequences, tuning of its split count and rows in flight,
# the tensor-core form against the CUDA-core one, and bench/cuda_vs_llamacpp.sh against a llama.cpp
# CUDA build made there from the packed source .gpu-peer/llama-src.tar.xz. Logs go to $OUT.
# Usage (there, from the checkout, carrying .gpu, and .gpu-peer for the peer step):
#   bash tools/cuda_decode_gpu.sh [steps...]
#   steps: peer ops memcheck mma ab tune prof stories e2e vs
# The llama.cpp build (~5-6 min on 16 cores) goes to /tmp/llama.cpp-build, outside the checkout:
# a build inside a carried folder is replaced by the next call's copy of that folder. The
# machine keeps it only while warm (30 s after a call), so `peer vs` belong in one call of their
# own (the build first, in the background; vs waits for it).
# VS_BUDGET: seconds since the start after which the side-by-side run is skipped (default 330).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/cuda_decode_out}
mkdir -p "$LOG"
STEPS=${*:-peer ops memcheck ab prof vs}
want() { [[ " $STEPS " == *" $1 "* ]]; }
R=/tmp/tessera_gpu
T=$R/tessera
W=/tmp/tessera_vs
M=$W/qwen3-0.6b
P=.gpu-peer
LS=/tmp/llama.cpp-src      # the unpacked source (its gguf-py writes the GGUF)
LB=/tmp/llama.cpp-build
status=0
SECONDS=0

if want peer && [ ! -x $LB/bin/llama-batched-bench ]; then
  mkdir -p $LS && { [ -d $LS/llama.cpp ] || tar -xJf $P/llama-src.tar.xz -C $LS; } || exit 1
  ( nice -n 19 cmake -S $LS/llama.cpp -B $LB -G Ninja -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DGGML_CCACHE=OFF >$LB.log 2>&1 &&
    nice -n 19 cmake --build $LB --target llama-bench llama-batched-bench -j 16 >>$LB.log 2>&1
    echo "llama.cpp build rc=$? after ${SECONDS}s" >>$LB.log ) &
  PEER_PID=$!
fi

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
  [ -d $LS/llama.cpp ] || { mkdir -p $LS && tar -xJf $P/llama-src.tar.xz -C $LS; }
  PYTHONPATH=$LS/llama.cpp/gguf-py python3 tools/gen_checkpoint.py qwen3-0.6b "$M" --dtype bf16 \
    --gguf "$W/qwen3-0.6b-bf16.gguf" --jobs 8 >"$W.gen.log" 2>&1 || { tail -5 "$W.gen.log"; status=1; }
fi

B=$LOG/bench.txt
if want mma; then # the tensor-core form against the CUDA-core one, in under a minute
  PYTHONPATH=$LS/llama.cpp/gguf-py python3 tools/gen_checkpoint.py qwen3-0.6b "$M" --dtype bf16 \
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
  if [ -n "${PEER_PID:-}" ]; then wait "$PEER_PID"; fi
  grep -E -B2 -A3 " error|Error" $LB.log 2>/dev/null | head -40 | tee "$LOG/peer_build.txt"
  tail -n 3 $LB.log 2>/dev/null | tee -a "$LOG/peer_build.txt"
  if [ ! -x $LB/bin/llama-batched-bench ]; then
    echo "no llama.cpp build"; status=1
  elif [ $SECONDS -gt "${VS_BUDGET:-330}" ]; then
    echo "side-by-side skipped: ${SECONDS}s spent"
  else
    PYTHONPATH=$LS/llama.cpp/gguf-py bash bench/cuda_vs_llamacpp.sh $LB/bin "$T" "$W" \
      2>&1 | grep -v "^ggml_cuda_init\|^  Device" | tee "$LOG/vs.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

echo "done in ${SECONDS}s, status $status"
exit $status
