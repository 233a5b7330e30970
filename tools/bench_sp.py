"""Sequence parallelism's memory: the activations autograd saves per rank in one text-EBT training step (the forward
with its MCMC steps and their energy gradients, taken with graph), TP=2 vs TP=2 + parallel.sequence_parallel.

Weights are left out of the count (they are the same shards either way); what SP removes is the blocks' norm inputs
and residual rows outside the tensor-parallel regions, of which each rank keeps L / 2 rows instead of L.

    python tools/bench_sp.py [--dim 256] [--num-layers 4] [--seq-len 64] [--batch-size 4] [--ebt-impl split]
"""

from __future__ import annotations

import argparse

import torch
from bench_pp import SavedTensorBytes  # tools/ is this script's directory
from spawn_ranks import run_on_ranks

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import DistInfo, ParallelConfig, with_parallel_groups
from ebwm_scale.parallel.parallelize import parallelize, vocab_split


def saved_bytes(args, dist_info: DistInfo, sequence_parallel: bool) -> int:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="ebt",
        modality="text",
        dim=args.dim,
        num_layers=args.num_layers,
        num_heads=8,
        vocab_size=256,
        ebt_impl=args.ebt_impl,
    )
    objective = build_objective(cfg.build(), MCMCConfig(alpha_init=20.0).build(), vocab_split(dist_info))
    parallelize(objective, ParallelConfig(tensor_parallel=2, sequence_parallel=sequence_parallel), dist_info)
    batch = {"tokens": torch.randint(0, 256, (args.batch_size, args.seq_len + 1))}
    with SavedTensorBytes() as saved:
        saved.seen.update(
            (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in objective.parameters()
        )
        loss = objective(batch).loss
    loss.backward()
    return saved.bytes


def _rank(rank: int, world: int, args) -> tuple[int, int, int]:
    info = with_parallel_groups(DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu")), 2)
    return rank, saved_bytes(args, info, False), saved_bytes(args, info, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ebt-impl", default="split", choices=("split", "masked"))
    args = parser.parse_args()
    results = run_on_ranks(_rank, 2, args)
    shape = f"dim {args.dim}, {args.num_layers} layers, seq {args.seq_len}, batch {args.batch_size}"
    print(f"text EBT ({args.ebt_impl}), {shape}: activations saved by one step's forward and MCMC, per rank")
    for rank, tp, sp in results:
        print(f"rank {rank}: TP=2 {tp / 2**20:.1f} MiB, TP=2 + SP {sp / 2**20:.1f} MiB, SP / TP = {sp / tp:.3f}")


if __name__ == "__main__":
    main()
