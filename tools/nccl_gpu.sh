#!/usr/bin/env bash
# One run of the NCCL path on a machine with 2+ GPUs, from tools/nccl_pack.sh's .nccl/pack.tar.xz:
#   1. test_nccl (2 ranks, one GPU each, against a serial reference);
#   2. serve: for stories260K-hf and a tiny random Qwen3: tessera serve --device cuda with T=1
#      (uni) and T=2 (mp workers over NCCL), one greedy completion each through the HTTP API; the
#      texts must be identical. The serve logs show the KV blocks --gpu-memory-utilization gave.
#   3. bench: decode tokens/s of T=1, T=2 over NCCL and P=2 on the Llama-3.1-8B shape (random
#      bf16 weights from tools/gen_checkpoint.py, made there in parallel), bench/dist_bench.py
#      at 1 and 16 concurrent streams.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0) here and in every process started from here.
# Logs go to $OUT (or /tmp/nccl_gpu_out).
# Usage: bash tools/nccl_gpu.sh [steps...]   steps: test serve bench (default: test serve)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG=${OUT:-/tmp/nccl_gpu_out}
mkdir -p "$LOG"
R=/tmp/tessera_nccl
rm -rf "$R" && mkdir -p "$R" && tar -xJf .nccl/pack.tar.xz -C "$R" || { echo "unpack failed"; exit 1; }
libdir() { find /usr/local /usr/lib /opt -name "$1" 2>/dev/null | head -1 | xargs -r dirname; }
NCCL_DIR=$(libdir libnccl.so.2)
CUBLAS_DIR=$(libdir libcublas.so.13)
CUDART_DIR=$(libdir libcudart.so.13)
LIBS=$R/lib:$NCCL_DIR:$CUBLAS_DIR:$CUDART_DIR
for b in tessera test_nccl; do
  mv "$R/$b" "$R/$b.bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
    "$LIBS" "$R/$b.bin" >"$R/$b"
  chmod +x "$R/$b"
done
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  echo "nccl from $NCCL_DIR; cublas from $CUBLAS_DIR; cudart from $CUDART_DIR"
  LD_LIBRARY_PATH=$LIBS ldd "$R/tessera.bin" | grep -E "not found|nccl" || true
} 2>&1 | tee "$LOG/env.txt"
status=0
STEPS=${*:-test serve}
want() { [[ " $STEPS " == *" $1 "* ]]; }

if want test; then
  echo "== test_nccl =="
  timeout 150 "$R/test_nccl" >"$LOG/test_nccl.log" 2>&1
  rc=$?; grep -v "^test_nccl: op" "$LOG/test_nccl.log" | tail -n 8; echo "test_nccl rc=$rc"
  [ "$rc" = 0 ] || status=1
fi

complete() { # port prompt -> greedy text on stdout
  python3 - "$1" "$2" <<'PY'
import json, sys, time, urllib.request
port, prompt = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=2).read(); break
    except Exception:
        time.sleep(0.1)
body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 48, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
print(json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"], end="")
PY
}

port=18100
want serve && for m in stories260K-hf tiny-qwen3; do
  texts=()
  for tp in 1 2; do
    port=$((port + 1))
    "$R/tessera" serve "$R/models/$m" --device cuda --tensor-parallel-size $tp --port $port \
      --host 127.0.0.1 --served-model-name m --max-model-len 256 --gpu-memory-utilization 0.3 \
      >"$LOG/serve_${m}_tp$tp.log" 2>&1 &
    pid=$!
    t=$(timeout 90 bash -c "$(declare -f complete); complete $port 'Once upon a time'" 2>>"$LOG/serve_${m}_tp$tp.log")
    rc=$?
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
    texts+=("$t")
    echo "$m tp=$tp rc=$rc: $(printf %s "$t" | head -c 120 | tr '\n' ' ')"
    grep -iE "blocks|error|nccl|fail" "$LOG/serve_${m}_tp$tp.log" | head -n 4
    [ "$rc" = 0 ] && [ -n "$t" ] || status=1
  done
  if [ "${texts[0]}" == "${texts[1]}" ]; then echo "$m: T=2 over NCCL == T=1 (EXACT)"; else
    echo "$m: T=2 DIFFERS from T=1"; status=1; fi
done

if want bench; then
  M=/tmp/llama-3.1-8b
  echo "== decode: T=1 vs T=2 (NCCL) vs P=2, Llama-3.1-8B shape, bf16 =="
  t0=$(date +%s)
  python3 tools/gen_checkpoint.py llama-3.1-8b "$M" --dtype bf16 --jobs "$(nproc)" \
    --tokenizers "$R/tokenizers" >"$LOG/gen.log" 2>&1 || { tail -3 "$LOG/gen.log"; exit 1; }
  echo "checkpoint made in $(( $(date +%s) - t0 )) s: $(du -sh "$M" | cut -f1)"
  SA="--device cuda --max-model-len 2048 --gpu-memory-utilization 0.5"
  for c in 1 16; do
    echo "-- $c concurrent stream(s), 128 tokens each --"
    timeout 400 python3 bench/dist_bench.py "$R/tessera" "$M" --layouts uni,tp2,pp2 \
      --tokens 128 --runs 3 --concurrency $c --serve-args "$SA" 2>&1 | tee -a "$LOG/bench.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi
exit $status
