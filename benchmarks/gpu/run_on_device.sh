#!/usr/bin/env bash
# On the lent GPU machine: make the kit importable, build llama-cpp-python with CUDA when the kit
# holds no built wheel, then run the command given ("$@"). Results go under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD/.gpukit/site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
mkdir -p /tmp/llama_site
if ls .gpukit/llama_cuda/*.whl.part* >/dev/null 2>&1; then
  cat .gpukit/llama_cuda/*.whl.part* > /tmp/llama_cpp_python-0.3.36-cp312-cp312-linux_x86_64.whl
  python3 -m pip install -q --no-deps --no-index --target /tmp/llama_site /tmp/llama_cpp_python-*.whl
elif [ -n "${BUILD_LLAMA:-}" ]; then
  ( start=$(date +%s)
    mkdir -p /tmp/lsrc && tar xzf .gpukit/llama_src.tgz -C /tmp/lsrc
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=off -DLLAVA_BUILD=off" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 \
      timeout 520 python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/llama_wheel /tmp/lsrc/llama_cpp_python-0.3.36 \
      > "$OUT/llama_build.log" 2>&1
    echo "build rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/llama_build.log"
    mkdir -p "$OUT/llama_cuda"
    (cd /tmp/llama_wheel && split -b 15M llama_cpp_python-*.whl "$OUT/llama_cuda/llama.whl.part")
    python3 -m pip install -q --no-deps --no-index --target /tmp/llama_site /tmp/llama_wheel/*.whl ) &
  BUILD_PID=$!
fi
export PYTHONPATH="/tmp/llama_site:$PYTHONPATH"
"$@"
rc=$?
if [ -n "${BUILD_PID:-}" ]; then
  wait "$BUILD_PID"
  # Commands that need the freshly built llama.cpp run once it is there.
  if [ -n "${AFTER_BUILD:-}" ]; then bash -c "$AFTER_BUILD" || rc=$?; fi
fi
exit $rc
