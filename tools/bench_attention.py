"""Structured vs naive 2S attention for the EBT: one training step (forward, energy gradient with graph, outer
backward) of the same model with `ebt_impl: masked` (the literal 2S x 2S masked sequence, every MCMC step) and
`ebt_impl: split` (the default: real tokens once, then only the prediction rows, structured attention).

Prints, per sequence length, the step time and the activation bytes saved for backward of each, and their ratios.

    python tools/bench_attention.py [--seq-lens 256,1024,2048] [--dim 128] [--num-layers 2] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_pp import SavedTensorBytes  # tools/ is this script's directory

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig


def measure(impl: str, args, seq_len: int) -> tuple[float, float]:
    """(median seconds per training step, MB saved for backward) of the EBT with layout `impl`."""
    torch.manual_seed(0)
    shape = dict(dim=args.dim, num_layers=args.num_layers, num_heads=4)
    cfg = ModelConfig(kind="ebt", **shape, ebt_impl=impl, attn_impl="math")  # math for both: the structure differs
    objective = build_objective(cfg.build(), MCMCConfig(num_steps=args.mcmc_steps).build())
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len + 1))}
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        objective(batch).loss.backward()
        objective.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    with SavedTensorBytes() as saved:
        objective(batch).loss.backward()
    return statistics.median(times), saved.bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="256,1024,2048")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"EBT {args.num_layers} x {args.dim}, batch {args.batch_size}, {args.mcmc_steps} MCMC steps, CPU fp32")
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        naive_s, naive_mb = measure("masked", args, seq_len)
        split_s, split_mb = measure("split", args, seq_len)
        print(
            f"S={seq_len}: masked {naive_s * 1e3:.0f} ms, {naive_mb:.0f} MB saved; structured {split_s * 1e3:.0f} ms, "
            f"{split_mb:.0f} MB; naive / structured = {naive_s / split_s:.2f}x time, {naive_mb / split_mb:.2f}x memory"
        )


if __name__ == "__main__":
    main()
