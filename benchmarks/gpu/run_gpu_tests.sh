#!/usr/bin/env bash
# All of tests/test_gpu.py on a lent GPU machine (best with two GPUs), faster than one run:
# while llama-cpp-python's CUDA build runs (run_on_device.sh, BUILD_LLAMA=1), two pytest
# processes take one GPU each; then the tests that read every GPU's memory through nvml or use
# both GPUs run with both visible, and those that need llama.cpp once the build is done. The groups
# are made from the collected ids, so a test added to the file always runs in one of them.
# Usage (repo root, on the machine):
#   BUILD_LLAMA=1 AFTER_BUILD="bash /tmp/after_build.sh" bash benchmarks/gpu/run_on_device.sh bash benchmarks/gpu/run_gpu_tests.sh
# (this script writes /tmp/after_build.sh, the llama.cpp test). Logs: $OUT/gpu_tests_{a,b,both,llamacpp}.log
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
echo "collected $(wc -l <<<"$ids"): a $(wc -l <<<"$group_a"), b $(wc -l <<<"$group_b"), both $(wc -l <<<"$group_both"), llamacpp $(wc -l <<<"$group_llama")"
# On a one-GPU machine both groups share it (its memory holds both; the two-GPU tests skip).
second=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
CUDA_VISIBLE_DEVICES=0 "${pytest[@]}" $group_a > "$OUT/gpu_tests_a.log" 2>&1 & pid_a=$!
CUDA_VISIBLE_DEVICES=$second "${pytest[@]}" $group_b > "$OUT/gpu_tests_b.log" 2>&1 & pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
"${pytest[@]}" $group_both > "$OUT/gpu_tests_both.log" 2>&1; rc_both=$?
echo "rc a=$rc_a b=$rc_b both=$rc_both"
for f in a b both; do grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/gpu_tests_$f.log" | tail -5; done
# Written for run_on_device.sh, which runs it once the build is done. The ids go on one line
# (echo joins them): one a line made the second a command of its own, and that test never ran.
cat > /tmp/after_build.sh <<AFTER
${pytest[*]} $(echo $group_llama) > "$OUT/gpu_tests_llamacpp.log" 2>&1; rc=\$?
tail -3 "$OUT/gpu_tests_llamacpp.log"; exit \$rc
AFTER
[ $rc_a -eq 0 ] && [ $rc_b -eq 0 ] && [ $rc_both -eq 0 ]
