#!/usr/bin/env bash
# One full run of the CUDA backend on a GPU machine that has no jansson/pcre2/utf8proc/curl/
# microhttpd: the tessera binary and test_cuda_ops are built elsewhere (tools/cuda_pack.sh packs
# them with the shared libraries they need and the shared test data into .gpu/); this unpacks
# them and runs, logging to $OUT:
#   1. test_cuda_ops (every op against a float64 reference);
#   2. stories260K greedy on --device cuda, HF directory and GGUF, graphs on and off, against
#      REFERENCE.md's text; compute-sanitizer memcheck of a short run;
#   3. the random Qwen3-0.6B / Llama-3.2-1B-shaped bf16 checkpoints against transformers
#      (tools/cuda_e2e.py);
#   4. tessera serve on stories260K (device sampling in the engine) against generate
#      (tools/cuda_serve_check.py);
#   5. tessera bench on the Qwen3-0.6B shape: batch 1 and total decode at 8..256 sequences, with
#      device sampling (the default) and with every step's logits returned (--host-logits).
# Usage (on the GPU machine, from the checkout): bash tools/cuda_gpu.sh [steps...]
# where steps are any of: ops stories serve e2e bench (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/cuda_gpu_out}
mkdir -p "$LOG"
G=.gpu
R=/tmp/tessera_gpu
STEPS=${*:-ops stories serve bench e2e}
status=0
want() { [[ " $STEPS " == *" $1 "* ]]; }

rm -rf "$R" && mkdir -p "$R" && tar -xJf "$G/pack.tar.xz" -C "$R" || { echo "unpack failed"; exit 1; }
export TESSERA_SHARED=$R/shared
CUBLAS_DIR=$(dirname "$(ldconfig -p | awk '/libcublas\.so\.13 /{print $NF; exit}')" 2>/dev/null)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib; do
  [ -e "$d/libcublas.so.13" ] && CUBLAS_DIR=${CUBLAS_DIR:-$d}
done
# A build with NCCL loads the machine's own libnccl (tools/cuda_pack.sh leaves it out).
NCCL_DIR=$(find /usr/local /usr/lib /opt -name libnccl.so.2 2>/dev/null | head -1 | xargs -r dirname)
# Only the binaries see the carried libraries (python's own must not be replaced).
LIBS=$R/lib:${CUBLAS_DIR:-/usr/local/cuda/lib64}${NCCL_DIR:+:$NCCL_DIR}
for b in tessera test_cuda_ops; do
  mv "$R/$b" "$R/$b.bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
    "$LIBS" "$R/$b.bin" >"$R/$b"
  chmod +x "$R/$b"
done
T=$R/tessera
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  ldd --version | head -1
  echo "cublas from ${CUBLAS_DIR:-?}"
  LD_LIBRARY_PATH=$LIBS ldd "$T.bin" | grep -E "not found|cublas|cudart" || true
} 2>&1 | tee "$LOG/env.txt"

if want ops; then
  echo "== test_cuda_ops =="
  "$R/test_cuda_ops" >"$LOG/ops.log" 2>&1
  rc=$?; tail -n 3 "$LOG/ops.log"; echo "test_cuda_ops rc=$rc"; [ "$rc" = 0 ] || status=1
fi

if want stories; then
  echo "== stories260K on cuda =="
  ref=$(python3 -c 'import re,sys; print(re.search(r"```\n(.*?)\n```", open(sys.argv[1]).read(), re.S).group(1), end="")' \
    "$R/shared/models/stories260K/REFERENCE.md")
  for m in stories260K-hf stories260K/stories260K.gguf; do
    for g in 1 0; do
      outp=$(TESSERA_CUDA_GRAPHS=$g "$T" generate "$R/shared/models/$m" --device cuda 2>"$LOG/stories_err.txt")
      if [ "$outp" == "$ref" ]; then echo "stories $m graphs=$g: EXACT"; else
        echo "stories $m graphs=$g: DIFFERS"; status=1; echo "$outp" | head -3; tail -2 "$LOG/stories_err.txt"; fi
    done
  done
  grep -o "generated.*" "$LOG/stories_err.txt" || true
  if command -v compute-sanitizer >/dev/null; then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 "$T" generate \
      "$R/shared/models/stories260K-hf" --device cuda --max-tokens 24 >"$LOG/memcheck.txt" 2>&1
    rc=$?; tail -n 2 "$LOG/memcheck.txt"; echo "memcheck rc=$rc"; [ "$rc" = 0 ] || status=1
  fi
fi

if want serve; then
  echo "== serve (engine, device sampling) =="
  timeout 150 python3 tools/cuda_serve_check.py --tessera "$T" \
    --model "$R/shared/models/stories260K-hf" 2>&1 | tee "$LOG/serve.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

W=/tmp/tessera_ck
if want e2e || want bench; then
  echo "== checkpoints =="
  ( time python3 tools/cuda_e2e.py --tessera "$T" --work "$W" --only-checkpoints ) 2>&1 | tail -4
fi

if want bench; then
  echo "== bench (Qwen3-0.6B shape, bf16) =="
  Q=$W/qwen3-0.6b
  for g in 1 0; do
    TESSERA_CUDA_GRAPHS=$g "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 128 \
      --batch 1 --json 2>&1 | sed "s/^/graphs=$g /" | tee -a "$LOG/bench.txt"
  done
  "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 128 --batch 1 --json \
    --host-logits 2>&1 | sed "s/^/graphs=1 /" | tee -a "$LOG/bench.txt"
  TESSERA_KV_DTYPE=f32 "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 128 \
    --batch 1 --json 2>&1 | sed "s/^/graphs=1 kv=f32 /" | tee -a "$LOG/bench.txt"
  TESSERA_CUDA_PDL=0 "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 128 \
    --batch 1 --json 2>&1 | sed "s/^/graphs=1 pdl=0 /" | tee -a "$LOG/bench.txt"
  TESSERA_CUDA_FUSED=0 "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 128 \
    --batch 1 --json 2>&1 | sed "s/^/graphs=1 fused=0 /" | tee -a "$LOG/bench.txt"
  for b in 8 32 64 128 256; do
    "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 32 --batch $b --json 2>&1 \
      | sed "s/^/graphs=1 /" | tee -a "$LOG/bench.txt"
  done
  "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 32 --batch 256 --json \
    --host-logits 2>&1 | sed "s/^/graphs=1 /" | tee -a "$LOG/bench.txt"
  "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 32 --batch 256 --json \
    --temperature 0.8 --top-p 0.9 --top-k 40 2>&1 | sed "s/^/graphs=1 T=0.8 p=0.9 k=40 /" \
    | tee -a "$LOG/bench.txt"
  TESSERA_CUDA_STATS=1 "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 32 \
    --batch 256 2>&1 | grep -E "cuda stats|decode_tok_s" | sed "s/^/b=256 /" | tee -a "$LOG/bench.txt"
  TESSERA_CUDA_STATS=2 "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 8 \
    --batch 256 2>&1 | grep -E "cuda prof|decode_tok_s" | sed "s/^/b=256 /" | tee -a "$LOG/bench.txt"
  for st in 1 2; do # where a decode step's time goes: graph use, then per-op (eager) timings
    TESSERA_CUDA_STATS=$st "$T" bench "$Q" --device cuda --prompt-tokens 512 --gen-tokens 64 \
      --batch 1 2>&1 | grep -E "cuda (stats|prof)|decode_tok_s" | tee -a "$LOG/bench.txt"
  done
  python3 - <<'EOF' 2>&1 | tee -a "$LOG/bench.txt"
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"copy bandwidth (read+write) {2 * 20 * x.numel() / (s.elapsed_time(e) / 1e3) / 1e12:.2f} TB/s")
EOF
fi

if want e2e; then
  echo "== e2e vs transformers =="
  PYTHONUNBUFFERED=1 python3 tools/cuda_e2e.py --tessera "$T" --work "$W" --out "$LOG/e2e.txt" \
    ${E2E_ARGS:-} 2>&1 | grep -v "^<!--" | tail -n 40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
