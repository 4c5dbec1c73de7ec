#!/usr/bin/env bash
# The GPU checks in one short script (a lent GPU's time is short; the limits add up to 8.5 min), most
# important first: tests/test_cuda.py (parity with transformers in fp32 / bf16, sampler logprobs, the
# compiled decode step as CUDA graphs reused across calls, no host sync in a step), then our sampler
# against transformers' generate() in bf16 on Qwen3-1.7B's architecture with random weights: 8 x 8
# (eager and compiled) and batch 1 (eager and compiled: memory-bandwidth utilisation), each in a
# process of its own so that each compiled graph is built for its exact shapes. A summary of those
# figures closes the output. Each stage has its own time limit and log, so a failing stage hides
# nothing. FULL=1 adds the demo model's benchmark and a --quick pipeline on CUDA (~4 min more).
#
#   bash bench/gpu_check.sh [LOG_DIR]        # logs: LOG_DIR (default $OUT, else gpu_check/)
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log to $out/NAME.log, print the tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    grep -v "Loading weights\|Warning\|warnings.warn\|^\s*$" "$out/$name.log" | tail -n "${TAIL:-45}"
    echo "--- $name: exit $rc after $(($(date +%s) - start)) s"
}

stage env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
stage test_cuda 160 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py
stage bench_qwen3_1p7b_8x8 180 $PY bench/rollout.py --device cuda --models qwen3-1.7b --shapes 8x8 --compile --repeats 2
stage bench_qwen3_1p7b_batch1 150 $PY bench/rollout.py --device cuda --models qwen3-1.7b --shapes 1x1 --compile --repeats 2 --new-tokens 128
if [ "${FULL:-0}" = 1 ]; then
    TORCH_LOGS=perf_hints stage bench_demo 120 $PY bench/rollout.py --device cuda --models demo --shapes 8x8,64x1,1x1 --compile --repeats 3
    stage demo_quick 150 $PY pipeline.py --quick --procs 1 --out /tmp/gpu-demo
fi

echo "=== summary: Qwen3-1.7B architecture, bf16 (bench/rollout.py; ratios against transformers' generate())"
grep -h -A3 "^ *8x8 (\|^ *1x1 (" "$out/bench_qwen3_1p7b_8x8.log" "$out/bench_qwen3_1p7b_batch1.log" 2>/dev/null
