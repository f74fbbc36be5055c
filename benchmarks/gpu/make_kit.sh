#!/usr/bin/env bash
# Prepare .gpukit/: what the lent GPU machine lacks, carried to it by the device tool (it reaches
# no registry). Run here, in the repo root; the folder is ignored by git (.git/info/exclude).
#   site/        wheels for Python 3.12 unpacked (bitsandbytes trimmed to its CUDA 13 libraries)
#   wheels/      wheels kept packed (size limit), installed there by run_on_device.sh: transformers
#                as pinned in requirements.txt, newer than the machine's own
#   llama_src.tgz  llama-cpp-python's sdist without its vocab files, docs and git pack (size limit)
set -euo pipefail
kit=.gpukit
grep -qx '/.gpukit/' .git/info/exclude 2>/dev/null || echo '/.gpukit/' >> .git/info/exclude
rm -rf "$kit/site" "$kit/dl" "$kit/wheels" && mkdir -p "$kit/site" "$kit/dl" "$kit/wheels"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$kit/dl" bitsandbytes==0.50.2 gguf==0.19.0 nvidia-ml-py==13.615.71 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types typing-inspection scikit-build-core pathspec diskcache pytest==9.0.3 pluggy iniconfig pytest-timeout==2.4.0 \
  peft==0.21.2 accelerate==1.15.0 regex==2026.11.15 pydantic-settings==2.16.3 python-dotenv
python3 -m pip download -q --no-deps --only-binary=:all: -d "$kit/wheels" transformers==5.23.0
for w in "$kit"/dl/*.whl; do unzip -q -o "$w" -d "$kit/site"; done
# The GPU machine's torch is built for CUDA 13: keep only those bitsandbytes libraries.
find "$kit/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete
if [ ! -f "$kit/llama_src.tgz" ]; then
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$kit/dl" llama-cpp-python==0.3.36
  tmp=$(mktemp -d)
  tar xzf "$kit"/dl/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-0.3.36"
  rm -rf "$src/.git" "$src/vendor/llama.cpp/models"/*.gguf "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/.git"
  tar czf "$kit/llama_src.tgz" -C "$tmp" llama_cpp_python-0.3.36
  rm -rf "$tmp"
fi
rm -rf "$kit/dl"
du -sh "$kit"/*
