#!/usr/bin/env bash
# On the lent GPU machine: make the kit importable, build llama-cpp-python with CUDA (BUILD_LLAMA=1)
# unless an earlier call on the same warm machine built it already, then run the command given
# ("$@"). Results go under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/kit_wheels .gpukit/wheels/*.whl 2>&1 | grep -v "already exists" || true
# /tmp outlives a call while the machine stays warm (a folder in the working tree did not: a
# later call found it emptied), so a second call right after the first reuses the build.
LLAMA_SITE=/tmp/llama_cuda_site
export PYTHONPATH="/tmp/kit_wheels:$PWD/.gpukit/site:$LLAMA_SITE:$PWD:${PYTHONPATH:-}"
if [ -d "$LLAMA_SITE/llama_cpp" ]; then
  echo "llama-cpp-python with CUDA: built by an earlier call"
elif [ -n "${BUILD_LLAMA:-}" ]; then
  ( start=$(date +%s)
    mkdir -p /tmp/lsrc && tar xzf .gpukit/llama_src.tgz -C /tmp/lsrc
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=off -DLLAVA_BUILD=off" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 \
      timeout 520 python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/llama_wheel /tmp/lsrc/llama_cpp_python-0.3.36 \
      > "$OUT/llama_build.log" 2>&1
    echo "build rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/llama_build.log"
    python3 -m pip install -q --no-deps --no-index --target "$LLAMA_SITE.tmp" /tmp/llama_wheel/*.whl \
      && mv "$LLAMA_SITE.tmp" "$LLAMA_SITE" ) &
  BUILD_PID=$!
fi
"$@"
rc=$?
if [ -n "${BUILD_PID:-}" ]; then
  wait "$BUILD_PID"
  # Commands that need the freshly built llama.cpp run once it is there.
  if [ -n "${AFTER_BUILD:-}" ]; then bash -c "$AFTER_BUILD" || rc=$?; fi
fi
exit $rc
