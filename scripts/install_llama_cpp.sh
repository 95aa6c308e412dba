#!/usr/bin/env bash
# llama.cpp itself, for the tests that read an exported GGUF with it (tests/test_gguf_llama_cpp.py,
# scripts/gguf_llama_cpp.py): libllama b4965 from the prebuilt wheel llama-cpp-cffi 0.4.42, installed
# without its dependencies (it pins transformers < 5) into .llama-cpp/ (git-ignored), or into $1.
# Only the CPU extension module is kept (the wheel also carries CUDA and Vulkan builds, 300 MB).
# Needs the network once; the tests skip, saying so, when the folder is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${LORA_SDPO_LLAMA_CPP:-.llama-cpp}}"
PY="${PYTHON:-python3}"
if compgen -G "$DEST/llama/_llama_cpp_cpu.*.so" > /dev/null; then
    echo "llama.cpp already in $DEST"
    exit 0
fi
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" llama-cpp-cffi==0.4.42 cffi==2.1.1
rm -f "$DEST"/llama/_llama_cpp_cuda_*.so "$DEST"/llama/_llama_cpp_vulkan_*.so
echo "llama.cpp b4965 (llama-cpp-cffi 0.4.42) in $DEST"
