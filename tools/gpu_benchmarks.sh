#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (one lent GPU, ~12 minutes): the gpu_single recipe's EBT and AR
# throughput/MFU in bf16, eager and compiled, lean vs plain vocabulary-state memory, the recipe itself for a few
# hundred steps, nlp_1b.yaml's engine shrunk to 2 layers, and the trainer over a 1-rank NCCL process group.
# Results land in ${OUT:-gpu_results}/ (JSON + logs).
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
# The official small configuration (V = 50,277): EBT / AR step against the counted FLOP ratio, peak memory, with the
# state's buffers and the attention's own second derivative on CUDA under bf16 autocast.
run bench_step_official python tools/bench_step.py --official-small --device cuda --precision bf16 --batch-size 32 \
  --steps 20 --warmup 5
run bench_memory python tools/bench_memory.py --device cuda --precision bf16 --seq-len 1024 --batch-size 8 --dim 1024
run recipe python ebwm_scale/pretrain.py recipes/gpu_single.yaml train.max_steps=300 "train.output_dir=$out/runs" \
  train.progress_bar=false
# nlp_1b.yaml as it runs on a cluster (DeepSpeed ZeRO-2, bf16 autocast over fp32 weights, full activation
# checkpointing, accumulation 2, the time token and fused context attention), 2 layers on the built-in byte corpus
# so that no shards are needed; its process group is cpu:gloo,cuda:nccl.
run nlp_1b_shrunk python ebwm_scale/pretrain.py recipes/nlp_1b.yaml model.num_layers=2 data.source=stdlib_docs \
  model.vocab_size=256 train.max_steps=20 train.log_interval_steps=5 tracking.enabled=false \
  "train.output_dir=$out/runs" train.progress_bar=false
# The trainer under torchrun with one rank and its process group forced open: every step's collectives (gradient
# and metric averages, the stop flag, checkpoint bookkeeping) go through NCCL or gloo as they would on a cluster.
run nccl_one_rank python -m torch.distributed.run --standalone --nproc-per-node 1 ebwm_scale/pretrain.py \
  recipes/gpu_single.yaml parallel.force_distributed=true train.max_steps=20 train.log_interval_steps=5 \
  tracking.enabled=false "train.output_dir=$out/runs_nccl" train.progress_bar=false
