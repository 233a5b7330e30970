"""Render a video model's next-frame predictions next to the true frames, as a PNG grid (optionally into MLflow).

For each of --clips validation clips of the run's latent shards: the top row shows the true frames 1..S, the row
under it what the model predicted for each from the frames before it (EBT: MCMC refinement from noise, AR: one
forward pass). Latents are turned back into pixels by the decoder of the frame encoder the shards were made with
(meta.json); the Stable Diffusion VAE needs its local directory again (--vae-path).

    python tools/render_predictions.py runs/video_tiny/checkpoints --latest predictions.png [--mlflow]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ebwm_scale.core.objective import EBTObjective, split_batch
from ebwm_scale.data.frame_encoders import encoder_from_meta
from ebwm_scale.data.loader import ShardSamples, ShardSource
from ebwm_scale.inference.export import load_checkpoint
from ebwm_scale.train.checkpoint import Checkpointer


def predicted_frames(objective, frames: torch.Tensor, num_steps: int | None) -> torch.Tensor:
    """(B, S, D) model predictions of frames 1..S of standardized clips (B, S + 1, D)."""
    ctx, _ = split_batch({"frames": frames})
    if isinstance(objective, EBTObjective):
        return objective.predict(ctx, num_steps=num_steps).pred
    return objective.predict(ctx)


def grid(rows: list[np.ndarray], scale: int) -> Image.Image:
    """Rows of frames (S, H, W, 3) uint8 -> one image, 2 px gaps, upscaled `scale` times (nearest)."""
    num_frames, height, width, _ = rows[0].shape
    gap = 2
    canvas = np.full((len(rows) * (height + gap), num_frames * (width + gap), 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for f, frame in enumerate(row):
            top, left = r * (height + gap), f * (width + gap)
            canvas[top : top + height, left : left + width] = frame
    image = Image.fromarray(canvas)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, or with --latest a checkpoint_dir")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--latest", action="store_true", help="use the newest complete checkpoint in the dir")
    parser.add_argument("--shards", default="", help="latent shards (default: the run's data.shards.url)")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--mcmc-steps", type=int, default=0, help="EBT refinement steps (0: as trained)")
    parser.add_argument("--vae-path", default="", help="sd_vae shards: the local VAE directory")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="the EBT's start noise")
    parser.add_argument("--mlflow", action="store_true", help="log the PNG to the run's MLflow run")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint
    if args.latest:
        checkpoint = Checkpointer(args.checkpoint, keep_last=1).latest()
        if checkpoint is None:
            sys.exit(f"no complete checkpoint in {args.checkpoint}")
    cfg, objective, trainer_state = load_checkpoint(checkpoint)
    objective.eval()
    if cfg.model.modality != "frames":
        sys.exit(f"{checkpoint} is a {cfg.model.modality} model; this tool renders frame predictions")
    source = ShardSource.open(args.shards or cfg.data.shards.url, "val")
    encoder = encoder_from_meta(source.meta["encoder"], vae_path=args.vae_path)
    stats = source.meta["latents"]
    samples = ShardSamples(source)
    clips = torch.stack([torch.from_numpy(samples[i]["frames"]) for i in range(min(args.clips, len(samples)))])
    torch.manual_seed(args.seed)
    with torch.no_grad():
        predicted = predicted_frames(objective, clips, args.mcmc_steps or None)

    def pixels(latents: torch.Tensor) -> np.ndarray:
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        return encoder.decode((latents.float().numpy() * std + mean).astype(np.float32))

    rows = []
    for true, pred in zip(clips[:, 1:], predicted):
        rows += [pixels(true), pixels(pred)]
    image = grid(rows, args.scale)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    Path(args.out).write_bytes(buffer.getvalue())
    mse = float(torch.nn.functional.mse_loss(predicted, clips[:, 1:]))
    print(f"{args.out}: {len(clips)} clips x {clips.shape[1] - 1} frames (true above predicted), latent MSE {mse:.4f}")
    if args.mlflow:
        run_id = trainer_state["callbacks"].get("MLflowCallback", {}).get("run_id")
        if not run_id:
            sys.exit(f"{checkpoint} records no MLflow run (was tracking.enabled false?)")
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"predictions_step{trainer_state['step']:08d}.png"
            named.write_bytes(buffer.getvalue())
            mlflow.MlflowClient(cfg.tracking.uri).log_artifact(run_id, str(named), artifact_path="predictions")
        print(f"logged to MLflow run {run_id} at {cfg.tracking.uri} (artifacts/predictions/{named.name})")


if __name__ == "__main__":
    main()
