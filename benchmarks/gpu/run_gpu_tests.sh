#!/usr/bin/env bash
# All of tests/test_gpu.py on a lent GPU machine (best with two GPUs), in one call of the device
# tool (600 s at most): while llama-cpp-python's CUDA build runs (run_on_device.sh, BUILD_LLAMA=1),
# two pytest processes take one GPU each; the second, when its tests are done, waits for the
# build and runs those that need llama-cpp-python, beside the first's; then the tests that read
# every GPU's memory through nvml or use both GPUs run alone, with both visible. The groups are
# made from the collected ids, so a test added to the file always runs in one of them.
# Usage (repo root, on the machine):
#   BUILD_LLAMA=1 bash benchmarks/gpu/run_on_device.sh bash benchmarks/gpu/run_gpu_tests.sh
# GPU_TEST_GROUPS="a b" (then "both" in a second call on the same warm machine) splits the file
# over two calls when one would near the tool's 600 s; the default runs every group.
# Logs: $OUT/gpu_tests_{a,b,llamacpp,both}.log
set -uo pipefail
pytest=(python3 -m pytest -p no:cacheprovider -rs -v --timeout 400)
ids=$(python3 -m pytest -p no:cacheprovider --collect-only -q tests/test_gpu.py | grep '^tests/test_gpu.py::')
both='auto_device|job_waits|two_gpus|more_room'  # nvml sees every GPU whatever CUDA_VISIBLE_DEVICES says
heavy='qlora|bitsandbytes_on_cuda|transformers_on_cuda|quantized_variants'
group_both=$(grep -E "$both" <<<"$ids")
# Those that need llama-cpp-python (the GGUF export job among every job kind) wait for the build.
after='llamacpp|every_job_kind'
group_llama=$(grep -E "$after" <<<"$ids" | grep -vE "$both")
rest=$(grep -vE "$both|$after" <<<"$ids")
group_a=$(grep -E "$heavy" <<<"$rest")
group_b=$(grep -vE "$heavy" <<<"$rest")
wanted=" ${GPU_TEST_GROUPS:-a b both} "  # b takes the llama.cpp group after it
for g in a b both; do [[ "$wanted" == *" $g "* ]] || declare "group_$g="; done
[[ "$wanted" == *" b "* ]] || group_llama=
echo "collected $(grep -c . <<<"$ids"): a $(grep -c . <<<"$group_a"), b $(grep -c . <<<"$group_b"), llamacpp $(grep -c . <<<"$group_llama"), both $(grep -c . <<<"$group_both")"

# run_on_device.sh's build: it logs "build rc=N" when the wheel is made, then installs it here.
llama_site=/tmp/llama_cuda_site
wait_for_llama() {
  local waited=0
  # no build log: no build was asked for (an earlier call's may be in place)
  while [ ! -d "$llama_site/llama_cpp" ] && [ -f "$OUT/llama_build.log" ] && [ "$waited" -lt 480 ]; do
    if grep -q "build rc=" "$OUT/llama_build.log"; then
      # the wheel is installed after that line: a minute for it, then on either way
      for _ in $(seq 12); do [ -d "$llama_site/llama_cpp" ] && break; sleep 5; done
      break
    fi
    sleep 5; waited=$((waited + 5))
  done
  if [ -d "$llama_site/llama_cpp" ]; then
    echo "llama-cpp-python with CUDA: there after ${waited} s of waiting"
  else
    echo "llama-cpp-python with CUDA: not built"
  fi
}

# pytest given no ids would collect the whole suite: a group left out runs nothing.
run_group() { local ids=$1; shift; [ -z "$ids" ] && { echo "group not asked for"; return 0; }; "${pytest[@]}" $ids "$@"; }

# On a one-GPU machine both processes share it (its memory holds both; the two-GPU tests skip).
second=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
CUDA_VISIBLE_DEVICES=0 run_group "$group_a" > "$OUT/gpu_tests_a.log" 2>&1 & pid_a=$!
(
  CUDA_VISIBLE_DEVICES=$second run_group "$group_b" > "$OUT/gpu_tests_b.log" 2>&1; rc_b=$?
  [ -n "$group_llama" ] && wait_for_llama >> "$OUT/gpu_tests_llamacpp.log"
  CUDA_VISIBLE_DEVICES=$second run_group "$group_llama" >> "$OUT/gpu_tests_llamacpp.log" 2>&1; rc_llama=$?
  exit $(( rc_b != 0 || rc_llama != 0 ))
) & pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
run_group "$group_both" > "$OUT/gpu_tests_both.log" 2>&1; rc_both=$?
echo "rc a=$rc_a b+llamacpp=$rc_b both=$rc_both"
for f in a b llamacpp both; do grep -E '^(FAILED|ERROR)|passed|failed|llama-cpp-python' "$OUT/gpu_tests_$f.log" | tail -5; done
[ $rc_a -eq 0 ] && [ $rc_b -eq 0 ] && [ $rc_both -eq 0 ]
