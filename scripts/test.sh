#!/usr/bin/env bash
# The whole test suite: set-up and build, a sanitizer build of the unit tests, bounded fuzzing of
# every parser, then the unit tests (ctest) and the black-box tests of the binary (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== sanitizer build (ASan + UBSan) =="
cmake -S . -B build-asan -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug \
  -DTESSERA_SANITIZE=ON -DTESSERA_FUZZ=ON -DTESSERA_CUDA=OFF >/dev/null
cmake --build build-asan -j"$(nproc)"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j"$(nproc)" \
  -L sanitize

echo "== fuzzing (bounded) =="
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
for f in build-asan/fuzz_*; do
  [ -x "$f" ] || continue
  name=$(basename "$f")
  corpus=fuzz/corpus/${name#fuzz_}
  mkdir -p "build-asan/corpus-$name"
  args=("build-asan/corpus-$name")
  [ -d "$corpus" ] && args+=("$corpus")
  echo "-- $name (${FUZZ_SECONDS}s)"
  "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=0 \
    -artifact_prefix=build-asan/ \
    "${args[@]}" 2>&1 | tail -n 2
done

echo "== aarch64 CPU kernels (NEON) under qemu =="
bash scripts/cross-aarch64.sh build-aarch64

echo "== unit tests =="
ctest --test-dir build --output-on-failure -j"$(nproc)"
echo "== black-box tests =="
.venv/bin/python -m pytest -q tests/py
