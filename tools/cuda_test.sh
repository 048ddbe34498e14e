#!/usr/bin/env bash
# Builds the CUDA backend and its op test with nvcc/gcc directly (no pkg-config dependencies, so
# it runs on a bare GPU machine), runs the test, then runs it again under compute-sanitizer's
# memcheck and racecheck. Logs go to $OUT (or build-cuda-dev/) for collection.
# With CUDA_BENCH=1 it also builds and runs bench/cuda_bench.c (timings of the hot ops).
# Usage: [CUDA_BENCH=1] bash tools/cuda_test.sh [arch, default 90]
set -uo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-90}
B=build-cuda-dev
LOG=${OUT:-$B}
mkdir -p "$B" "$LOG"
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
status=0

build() {
  local objs=()
  for f in src/backend/cuda/*.cu; do
    o=$B/$(basename "$f").o
    nvcc -O2 -std=c++17 -lineinfo -Isrc -gencode "arch=compute_$ARCH,code=[sm_$ARCH,compute_$ARCH]" \
      -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror -c "$f" -o "$o" || return 1
    objs+=("$o")
  done
  for f in src/util/status.c src/util/tensor.c src/engine/sampling.c tests/unit/cuda/test_cuda_ops.c; do
    o=$B/$(basename "$f").o
    gcc -O2 -g -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -Isrc -I"$CUDA_HOME/include" \
      -DTESSERA_SHARED_DEFAULT='"../shared"' -c "$f" -o "$o" || return 1
    objs+=("$o")
  done
  local lib=("${objs[@]}")
  unset 'lib[${#lib[@]}-1]' # every object but the test's main
  g++ -o "$B/test_cuda_ops" "${objs[@]}" -L"$CUDA_HOME/lib64" -lcublas -lcudart -lm -lpthread || return 1
  if [ "${CUDA_BENCH:-0}" = 1 ]; then
    gcc -O2 -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -Isrc -I"$CUDA_HOME/include" \
      -c bench/cuda_bench.c -o "$B/cuda_bench.o" || return 1
    g++ -o "$B/cuda_bench" "${lib[@]}" "$B/cuda_bench.o" -L"$CUDA_HOME/lib64" -lcublas -lcudart \
      -lm -lpthread || return 1
  fi
}

echo "== build (sm_$ARCH) =="
build 2>&1 | tee "$LOG/build.log" || { echo "BUILD FAILED"; exit 1; }
[ -x "$B/test_cuda_ops" ] || { echo "BUILD FAILED"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$LOG/gpu.txt"

echo "== test_cuda_ops =="
"$B/test_cuda_ops" 2>&1 | tee "$LOG/test.log"
rc=${PIPESTATUS[0]}; echo "test rc=$rc"; [ "$rc" = 0 ] || status=1

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool =="
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 99 "$B/test_cuda_ops" \
      >"$LOG/sanitizer_$tool.log" 2>&1
    rc=$?; tail -n 5 "$LOG/sanitizer_$tool.log"; echo "$tool rc=$rc"; [ "$rc" = 0 ] || status=1
  done
else
  echo "compute-sanitizer not found"
fi
if [ "${CUDA_BENCH:-0}" = 1 ]; then
  echo "== cuda_bench =="
  "$B/cuda_bench" 2>&1 | tee "$LOG/bench.log" || status=1
fi
exit $status
