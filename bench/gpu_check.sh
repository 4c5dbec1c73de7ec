#!/usr/bin/env bash
# The GPU checks in one script (a lent GPU's time is short), most important first: tests/test_cuda.py
# (parity with transformers in fp32 / bf16, sampler logprobs, compiled decode), the sampler benchmark
# in bf16 (eager and compiled, vs generate(), batch-1 memory bandwidth) on the demo model and on
# Qwen3-1.7B's architecture with random weights, then a --quick demo on the GPU (rollout.py, sft.py
# and rl.py on CUDA). Each stage has its own time limit and log, so a failing stage hides nothing.
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

stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
stage test_cuda 150 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py
TORCH_LOGS=perf_hints stage bench_demo 140 $PY bench/rollout.py --device cuda --models demo --shapes 8x8,64x1 --compile --repeats 3
stage bench_qwen3_1p7b 120 $PY bench/rollout.py --device cuda --models qwen3-1.7b --shapes 8x8 --repeats 2
stage bench_qwen3_1p7b_compiled 150 $PY bench/rollout.py --device cuda --models qwen3-1.7b --shapes "" --compile --repeats 2
stage demo_quick 150 $PY pipeline.py --quick --procs 1 --out /tmp/gpu-demo
