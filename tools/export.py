"""Export a training checkpoint to safetensors + config JSON (no optimizer, no ranks: topology-independent).

    python tools/export.py runs/ci_tiny/checkpoints/step_00000200 exports/ci_tiny
    python tools/export.py runs/ci_tiny/checkpoints --latest exports/ci_tiny

Paths may be any fsspec URL (s3://..., gs://..., file://...).
"""

from __future__ import annotations

import argparse

from ebwm_scale.errors import run_cli
from ebwm_scale.inference.export import export_checkpoint
from ebwm_scale.train.checkpoint import Checkpointer, CheckpointError


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, or with --latest a checkpoint_dir")
    parser.add_argument("out", help="output directory for model.safetensors and config.json")
    parser.add_argument("--latest", action="store_true", help="export the newest complete checkpoint in the dir")
    args = parser.parse_args(argv)
    source = args.checkpoint
    if args.latest:
        source = Checkpointer(args.checkpoint, keep_last=1).latest()
        if source is None:
            raise CheckpointError(f"no complete checkpoint in {args.checkpoint}")
    export_checkpoint(source, args.out)
    print(f"exported {source} -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
