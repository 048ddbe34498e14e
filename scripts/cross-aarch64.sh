#!/usr/bin/env bash
# Cross-compiles the CPU kernel tests for aarch64 (Debian's gcc-aarch64-linux-gnu) and runs them
# under qemu-user, so the NEON kernels are executed, not just compiled. Only the CPU backend and
# the utilities it needs are built (the rest of the library needs target copies of its
# dependencies). Usage: scripts/cross-aarch64.sh [OUT_DIR]   (default build-aarch64)
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
OUT=${1:-build-aarch64}
if ! command -v "$CC" >/dev/null || ! command -v "$QEMU" >/dev/null; then
  echo "cross-aarch64: $CC or $QEMU missing (apt-get install gcc-aarch64-linux-gnu qemu-user)" >&2
  exit 1
fi
mkdir -p "$OUT"
SRCS=(src/backend/cpu/*.c src/backend/backend.c src/backend/kv_cache.c src/util/log.c
  src/util/status.c src/util/tensor.c src/util/threadpool.c)
for t in test_cpu_ops test_quant test_quant_repack test_cpu_bf16 test_cpu_amx test_quant_amx test_cpu_attention; do
  "$CC" -std=c11 -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -pthread -static -Isrc -Itests/unit \
    -DTESSERA_SHARED_DEFAULT="\"$PWD/../shared\"" -DTESSERA_SOURCE_DIR="\"$PWD\"" \
    -DTESSERA_BINARY_DIR="\"$PWD/$OUT\"" -o "$OUT/$t" "tests/unit/$t.c" "${SRCS[@]}" -lm
done
for t in test_cpu_ops test_quant test_quant_repack test_cpu_bf16 test_cpu_amx test_quant_amx test_cpu_attention; do
  echo "-- $t (aarch64, qemu)"
  "$QEMU" "$OUT/$t" 2>&1 | tail -n 1
done
