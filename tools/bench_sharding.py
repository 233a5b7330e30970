"""Per-rank model-state memory of the ways data-parallel ranks share it, for the text EBT on CPU ranks (gloo): `ddp`,
ZeRO-1 (`parallel.shard_optimizer`), DeepSpeed ZeRO-1/2/3 and `fsdp`.

Counted from the live tensors (every tensor Python can reach, each storage once): `at_rest_mb` after a training
step (weights, optimizer state, the engine's buffers; gradients are freed), and `before_step_mb` when the optimizer
step is about to run (gradients reduced, and under fsdp the weights its blocks gathered; ZeRO-3 has partitioned them
again by then). The host's resident set is no measure here: the allocator keeps what activations freed. Each mode
runs in fresh processes.

    python tools/bench_sharding.py [--ranks 2] [--dim 768] [--num-layers 12] [--modes ddp,zero1,ds1,ds2,ds3,fsdp]
        [--reduce-bucket-size 10000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch
from spawn_ranks import run_on_ranks  # tools/ is this script's directory
from torch.distributed.tensor import DTensor

from ebwm_scale.config import load_config
from ebwm_scale.parallel.dist import DistInfo
from ebwm_scale.pretrain import build_trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ci_tiny.yaml"
CPU = torch.device("cpu")
MODES = {
    "ddp": ["parallel.data_parallel=ddp"],
    "zero1": ["parallel.data_parallel=ddp", "parallel.shard_optimizer=true"],
    "ds1": ["parallel.data_parallel=zero", "parallel.zero_stage=1"],
    "ds2": ["parallel.data_parallel=zero", "parallel.zero_stage=2"],
    "ds3": ["parallel.data_parallel=zero", "parallel.zero_stage=3"],
    "fsdp": ["parallel.data_parallel=fsdp"],
}


def _rank(rank: int, world: int, args, mode: str) -> dict:
    overrides = [
        *MODES[mode],
        *([f"parallel.deepspeed_config={args.deepspeed_config}"] if mode.startswith("ds") else []),
        f"model.dim={args.dim}",
        f"model.num_layers={args.num_layers}",
        f"model.num_heads={args.dim // 64}",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "train.checkpoint_interval_steps=0",
        "train.eval_interval_steps=0",
        "train.progress_bar=false",
        "tracking.enabled=false",
        f"train.output_dir={tempfile.mkdtemp(prefix='bench-sharding-')}",
    ]
    trainer = build_trainer(load_config(RECIPE, overrides), DistInfo(rank, rank, world, CPU))
    optimizer_step, before_step = trainer.engine.optimizer_step, []

    def measure_then_finish(skip: bool) -> float:
        before_step.append(live_tensor_bytes())
        return optimizer_step(skip)

    trainer.engine.optimizer_step = measure_then_finish
    for _ in range(2):
        trainer.train_step()
    at_rest = live_tensor_bytes()
    return {
        "mode": mode,
        "rank": rank,
        "params": trainer.num_params,
        "at_rest_mb": at_rest / 2**20,
        "before_step_mb": before_step[-1] / 2**20,
    }


def live_tensor_bytes() -> int:
    """Bytes of every storage a live Python tensor or a parameter's .grad views, each counted once (a .grad has no
    Python object of its own until read)."""
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    tensors += [t.grad for t in tensors if isinstance(t, torch.nn.Parameter) and t.grad is not None]
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if not tensor.is_meta and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--reduce-bucket-size",
        type=int,
        default=10**7,
        help="DeepSpeed's gradient bucket in elements; ZeRO-3 allocates it up front (DeepSpeed's default 5e8: "
        "1.9 GB in fp32, more than this model's whole state)",
    )
    args = parser.parse_args()
    args.deepspeed_config = str(Path(tempfile.mkdtemp(prefix="bench-sharding-ds-")) / "deepspeed.json")
    zero = {"reduce_bucket_size": args.reduce_bucket_size, "stage3_param_persistence_threshold": 0}
    Path(args.deepspeed_config).write_text(json.dumps({"zero_optimization": zero}))
    for mode in args.modes.split(","):
        for row in run_on_ranks(_rank, args.ranks, args, mode):
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
