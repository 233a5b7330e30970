"""Checkpoint save and load on CPU ranks (gloo) for a 125M-class EBT: per rank, the wall time of the save (sync: until
it is committed; async: until the step may go on, and until the checkpoint is committed), of the load (a fresh
trainer's resume), and the peak host memory each adds above the level before it.

    python tools/bench_checkpoint.py [--ranks 2] [--mode sync|async] [--dim 896] [--num-layers 12] [--out DIR]

Runs one training step first, so that AdamW's moments exist. `--mode async` needs a version with
train.checkpoint_async; the script also runs against older versions of the package (sync only), to compare formats.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_memory import PeakMemory  # tools/ is this script's directory
from spawn_ranks import run_on_ranks

from ebwm_scale.config import load_config
from ebwm_scale.parallel.dist import DistInfo
from ebwm_scale.pretrain import build_trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ci_tiny.yaml"
CPU = torch.device("cpu")


def _trainer(args, rank: int, world: int, out: str):
    overrides = [
        f"model.dim={args.dim}",
        f"model.num_layers={args.num_layers}",
        f"model.num_heads={args.dim // 64}",
        "data.seq_len=8",
        "data.micro_batch_size=1",
        "train.max_steps=1",
        "train.checkpoint_interval_steps=0",
        "train.eval_interval_steps=0",
        "train.progress_bar=false",
        "tracking.enabled=false",
        f"train.output_dir={out}",
    ]
    if args.mode == "async":
        overrides.append("train.checkpoint_async=true")
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=CPU)
    return build_trainer(load_config(RECIPE, overrides), info)


def _rank(rank: int, world: int, args) -> dict:
    trainer = _trainer(args, rank, world, args.out)
    trainer.train_step()
    dist.barrier()
    with PeakMemory(CPU) as save_memory:
        start = time.perf_counter()
        path = trainer.save_checkpoint()
        returned = time.perf_counter() - start
        if args.mode == "async":
            trainer.checkpointer.finish()
        committed = time.perf_counter() - start
    dist.barrier()
    fresh = _trainer(args, rank, world, f"{args.out}/fresh")
    dist.barrier()
    with PeakMemory(CPU) as load_memory:
        start = time.perf_counter()
        fresh.resume(path)
        loaded = time.perf_counter() - start
    return {
        "rank": rank,
        "save_returns_s": returned,
        "save_committed_s": committed,
        "save_peak_mb": save_memory.peak / 2**20,
        "load_s": loaded,
        "load_peak_mb": load_memory.peak / 2**20,
        "params": trainer.num_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--out", default=None, help="where the runs write (default: a temp dir)")
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="bench-checkpoint-")
    rows = run_on_ranks(_rank, args.ranks, args)
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, {args.ranks} ranks, {args.mode}")
    for row in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
