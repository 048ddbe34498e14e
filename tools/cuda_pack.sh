#!/usr/bin/env bash
# Packs what tools/cuda_gpu.sh needs on a GPU machine that lacks the build's libraries:
# the tessera and test_cuda_ops binaries of a build directory, the shared libraries they load
# (all but glibc, libstdc++/libgcc and CUDA's, which that machine has), and the shared test data
# (stories260K, the qwen3 and llama3 tokenizers) into .gpu/pack.tar.xz. .gpu/ is to be listed in
# .git/info/exclude and carried. Usage: bash tools/cuda_pack.sh [build dir, default build]
# [output dir, default .gpu] (test_cuda_prefill is packed too when the build has it)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
O=${2:-.gpu}
S=${TESSERA_SHARED:-../shared}
P=$(mktemp -d)
mkdir -p "$P/lib" "$P/shared/models" "$P/shared/tokenizers" "$O"
cp "$B/tessera" "$B/src/backend/cuda/test_cuda_ops" "$P/"
if [ -e "$B/src/backend/cuda/test_cuda_prefill" ]; then cp "$B/src/backend/cuda/test_cuda_prefill" "$P/"; fi
ldd "$B/tessera" | awk '/=> \//{print $3}' | while read -r lib; do
  case $(basename "$lib") in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
    libcublas*|libcudart*|libcuda.so*|libnccl*) ;; # the GPU machine has its own
    *) cp -L "$lib" "$P/lib/" ;;
  esac
done
cp -r "$S/models/stories260K" "$S/models/stories260K-hf" "$P/shared/models/"
cp -r "$S/tokenizers/qwen3" "$S/tokenizers/llama3" "$P/shared/tokenizers/"
chmod -R u+w "$P"
tar -cJf "$O/pack.tar.xz" -C "$P" .
rm -rf "$P"
ls -la "$O/pack.tar.xz"
