#!/usr/bin/env bash
# Packs what tools/nccl_gpu.sh needs on a GPU machine that lacks the build's C libraries: the
# tessera and test_nccl binaries of a CUDA build, the shared libraries they load (all but glibc,
# libstdc++/libgcc, CUDA's and NCCL's, which that machine has), stories260K-hf and a tiny random
# Qwen3 checkpoint (tools/gen_checkpoint.py, bf16) and the Llama-3 tokenizer (for the bench's
# checkpoint) into .nccl/pack.tar.xz. List .nccl/ in
# .git/info/exclude and carry it. Usage: bash tools/nccl_pack.sh [build dir, default build]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
S=${TESSERA_SHARED:-../shared}
PY=${PYTHON:-.venv/bin/python}
P=$(mktemp -d)
mkdir -p "$P/lib" "$P/models" .nccl
cp "$B/tessera" "$B/src/backend/cuda/test_nccl" "$P/"
ldd "$B/tessera" | awk '/=> \//{print $3}' | while read -r lib; do
  case $(basename "$lib") in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libresolv.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
    libcublas*|libcudart*|libcuda.so*|libnccl*) ;;
    *) cp -L "$lib" "$P/lib/" ;;
  esac
done
cp -r "$S/models/stories260K-hf" "$P/models/"
mkdir -p "$P/tokenizers" && cp -r "$S/tokenizers/llama3" "$P/tokenizers/"
"$PY" tools/gen_checkpoint.py tiny-qwen3 "$P/models/tiny-qwen3" --dtype bf16 \
  --tokenizers "$S/tokenizers" >/dev/null
chmod -R u+w "$P"
tar -cJf .nccl/pack.tar.xz -C "$P" .
rm -rf "$P"
ls -la .nccl/pack.tar.xz
