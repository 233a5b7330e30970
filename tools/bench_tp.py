"""Tensor parallelism's cost on this machine: EBT train step with TP=2 (2 gloo processes) vs TP=1 (1 process).

On one 2-core CPU, TP=2 gives each rank half the matmul work but adds an all-reduce per attention and FFN block in the
forward, the energy-gradient backward and the outer backward; the printed ratio is (TP=2 step) / (TP=1 step), so
< 1 means a speed-up and 2 cores x perfect scaling would be 0.5. On GPUs with NVLink the picture differs.

    python tools/bench_tp.py [--dim 256] [--num-layers 4] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse

import torch
from bench_step import time_train_steps  # tools/ is this script's directory
from spawn_ranks import run_on_ranks

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import DistInfo, ParallelConfig, with_parallel_groups
from ebwm_scale.parallel.parallelize import parallelize, vocab_split


def step_seconds(args, dist_info: DistInfo | None) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="ebt", modality="text", dim=args.dim, num_layers=args.num_layers, num_heads=8, vocab_size=256
    )
    objective = build_objective(cfg.build(), MCMCConfig(alpha_init=20.0).build(), vocab_split(dist_info))
    if dist_info is not None:
        objective = parallelize(objective, ParallelConfig(tensor_parallel=2), dist_info)
    batch = {"tokens": torch.randint(0, 256, (args.batch_size, args.seq_len + 1))}
    return time_train_steps(objective, batch, args.warmup, args.steps)


def _rank(rank: int, world: int, args) -> float:
    info = with_parallel_groups(DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu")), 2)
    return step_seconds(args, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    single = step_seconds(args, None)
    tp2 = run_on_ranks(_rank, 2, args)[0]
    print(f"TP=1, 1 process ({torch.get_num_threads()} threads): {single * 1e3:.0f} ms/step")
    print(f"TP=2, 2 processes x 1 thread:  {tp2 * 1e3:.0f} ms/step")
    print(f"TP=2 / TP=1 step time = {tp2 / single:.2f}")


if __name__ == "__main__":
    main()
