"""Pipeline parallelism on this machine: train step time PP=2 (2 gloo processes) vs PP=1, memory per stage, bubble.

For each number of micro-batches M, two ranks run the EBT (or AR) schedule of ebwm_scale/parallel/pipeline.py and
report the median step time, the bubble (the share of the step a stage waits for its neighbour, averaged over
stages, as the trainer logs it) and each stage's parameters and activation bytes saved for backward in one
step. The baseline is one process with both cores.

    python tools/bench_pp.py [--kind ebt|ar] [--dim 256] [--num-layers 4] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from bench_step import time_train_steps  # tools/ is this script's directory
from spawn_ranks import run_on_ranks

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.models.blocks import count_params
from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
from ebwm_scale.parallel.pipeline import apply_pipeline, pipeline_schedule
from ebwm_scale.train.optim import OptimConfig


class SavedTensorBytes:
    """Bytes of the distinct tensors autograd saves for backward while active: the activation memory a step
    needs at most (peak RSS is useless here: importing torch peaks higher than a small model's step)."""

    def __init__(self):
        self.seen: set[tuple[int, int]] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def build(args):
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind=args.kind, modality="text", dim=args.dim, num_layers=args.num_layers, num_heads=8, vocab_size=256
    )
    mcmc = MCMCConfig(alpha_init=20.0, num_steps=args.mcmc_steps)
    batch = {"tokens": torch.randint(0, 256, (args.batch_size, args.seq_len + 1))}
    return build_objective(cfg.build(), mcmc.build()), mcmc, batch


def _rank(rank: int, world: int, args, microbatches: int):
    info = with_parallel_groups(DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu")), 1, 2)
    objective, mcmc, batch = build(args)
    apply_pipeline(objective, rank, 2)
    schedule = pipeline_schedule(objective, info, microbatches, mcmc)
    optimizer = OptimConfig().build(objective, alpha_lr_multiplier=1.0)
    times, bubbles = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        metrics = schedule.forward_backward(batch, 1.0, nullcontext())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            bubbles.append(float(metrics["pipeline_bubble"]))
    with SavedTensorBytes() as saved:
        schedule.forward_backward(batch, 1.0, nullcontext())
    stage = {"params": count_params(objective), "saved_mb": saved.bytes / 2**20}
    return statistics.median(times), statistics.median(bubbles), stage


def run_pipeline(args, microbatches: int):
    """(median step seconds, median bubble share) of stage 0, and each stage's parameters and saved bytes."""
    ranks = run_on_ranks(_rank, 2, args, microbatches)
    return ranks[0][0], ranks[0][1], [stage for _, _, stage in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ebt", "ar"], default="ebt")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--microbatches", default="1,2,4,8", help="comma-separated values of M to measure")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    objective, _, batch = build(args)
    threads = torch.get_num_threads()
    single = time_train_steps(objective, batch, args.warmup, args.steps)
    torch.set_num_threads(1)
    single_one_thread = time_train_steps(objective, batch, args.warmup, args.steps)
    torch.set_num_threads(threads)
    with SavedTensorBytes() as saved:
        objective(batch).loss.backward()
    print(
        f"{args.kind.upper()} {args.num_layers} x {args.dim}, S={args.seq_len}, B={args.batch_size}: "
        f"PP=1 (1 process) {single * 1e3:.0f} ms/step with {threads} threads, {single_one_thread * 1e3:.0f} with 1; "
        f"{count_params(objective) / 1e6:.2f} M params, {saved.bytes / 2**20:.0f} MB saved for backward"
    )
    for microbatches in (int(m) for m in args.microbatches.split(",")):
        seconds, bubble, stages = run_pipeline(args, microbatches)
        memory = "; ".join(
            f"stage {i}: {s['params'] / 1e6:.2f} M params, {s['saved_mb']:.0f} MB saved" for i, s in enumerate(stages)
        )
        print(
            f"PP=2 (1 thread per stage), M={microbatches}: {seconds * 1e3:.0f} ms/step "
            f"(x{seconds / single:.2f} of PP=1, x{seconds / single_one_thread:.2f} of PP=1 on 1 thread), "
            f"bubble {bubble:.0%}; {memory}"
        )


if __name__ == "__main__":
    main()
