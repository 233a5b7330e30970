#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (one lent GPU, ~10 minutes): the gpu_single recipe's EBT and AR
# throughput/MFU in bf16, eager and compiled, lean vs plain vocabulary-state memory, and the recipe itself for a
# few hundred steps. Results land in ${OUT:-gpu_results}/ (JSON + logs).
#
#   bash tools/gpu_benchmarks.sh            # on a machine with torch (CUDA build) and this package installed
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true
run() {  # name, command...: a failing benchmark is recorded and the next one still runs
  local name="$1"
  shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  "$@" > "$out/$name.log" 2>&1
  echo "   exit $?; $(tail -n 3 "$out/$name.log" | tr '\n' ' ')" | tee -a "$out/summary.txt"
}
run bench_gpu python tools/bench_gpu.py recipes/gpu_single.yaml --steps 40 --warmup 10 --json "$out/bench_gpu.json"
run bench_gpu_compiled python tools/bench_gpu.py recipes/gpu_single.yaml parallel.compile=true --steps 40 \
  --warmup 10 --json "$out/bench_gpu_compiled.json"
run bench_memory python tools/bench_memory.py --device cuda --precision bf16 --seq-len 1024 --batch-size 8 --dim 1024
run recipe python ebwm_scale/pretrain.py recipes/gpu_single.yaml train.max_steps=300 "train.output_dir=$out/runs" \
  train.progress_bar=false
