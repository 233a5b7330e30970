"""Write real video files of moving shapes under simple physics (gravity, bounces), deterministic by seed.

Each video is a pure function of (seed, variant, index): discs and squares of random colour fall under gravity and
bounce off the walls and floor, losing a little speed at each bounce. The `ood` variant is out of distribution for a
model trained on `train`: more objects, faster throws, stronger gravity (for System-2 evaluation).

    python tools/make_synthetic_videos.py videos/ [--num-videos 32] [--seconds 8] [--fps 16] [--size 64]
        [--variant train|ood] [--seed 0] [--codec libx264|mpeg4] [--container mp4|avi|mkv|png]

`--container png` writes each video as a folder of PNG frames (the image-sequence input of `ebwm-prep video`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VARIANT_SEEDS = {"train": 0, "ood": 1}


@dataclass(frozen=True)
class Physics:
    objects: tuple[int, int]  # inclusive range of the number of objects
    speed: float  # initial speed, in frame widths per second (at most)
    gravity: float  # frame widths per second^2
    restitution: float = 0.9  # share of the speed kept at a bounce


VARIANTS = {
    "train": Physics(objects=(1, 2), speed=0.6, gravity=1.0),
    "ood": Physics(objects=(3, 5), speed=1.2, gravity=1.6),
}


def simulate(rng: np.random.Generator, physics: Physics, num_frames: int, fps: float, substeps: int = 8):
    """Positions (T, n, 2) in [0, 1] and radii (n,) of objects thrown into a unit box with gravity along +y."""
    n = int(rng.integers(physics.objects[0], physics.objects[1] + 1))
    radius = rng.uniform(0.1, 0.2, n)
    position = rng.uniform(radius[:, None], 1 - radius[:, None], (n, 2))
    velocity = rng.uniform(-physics.speed, physics.speed, (n, 2))
    dt = 1.0 / (fps * substeps)
    positions = np.empty((num_frames, n, 2))
    for frame in range(num_frames):
        positions[frame] = position
        for _ in range(substeps):
            velocity[:, 1] += physics.gravity * dt
            position = position + velocity * dt
            low, high = radius[:, None], 1 - radius[:, None]
            hit = (position < low) | (position > high)
            position = np.clip(position, low, high)
            velocity = np.where(hit, -velocity * physics.restitution, velocity)
    return positions, radius


def render(positions: np.ndarray, radius: np.ndarray, colors: np.ndarray, squares: np.ndarray, size: int):
    """(T, size, size, 3) uint8 frames: the objects over a dark background."""
    grid = (np.arange(size) + 0.5) / size
    frames = np.full((len(positions), size, size, 3), 24, dtype=np.uint8)
    for t, frame_positions in enumerate(positions):
        for (x, y), r, color, square in zip(frame_positions, radius, colors, squares):
            dx, dy = np.abs(grid[None, :] - x), np.abs(grid[:, None] - y)
            inside = np.maximum(dx, dy) <= r * 0.85 if square else dx**2 + dy**2 <= r**2
            frames[t][inside] = color
    return frames


def make_video(seed: int, variant: str, index: int, num_frames: int, fps: float, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, VARIANT_SEEDS[variant], index])
    positions, radius = simulate(rng, VARIANTS[variant], num_frames, fps)
    colors = rng.integers(80, 256, (len(radius), 3), dtype=np.uint8)
    squares = rng.random(len(radius)) < 0.5
    return render(positions, radius, colors, squares, size)


def write_frames(path: str, frames: np.ndarray) -> None:
    """A folder of PNG frames, written under a temp name and renamed."""
    from PIL import Image

    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / f"{index:05d}.png")
    os.replace(tmp, path)


def write_video(path: str, frames: np.ndarray, fps: int, codec: str) -> None:
    """Encode frames (T, H, W, 3) uint8 with PyAV; written to a temp name and renamed, never half-written."""
    tmp = f"{path}.tmp-{os.getpid()}{Path(path).suffix}"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="directory for the video files")
    parser.add_argument("--num-videos", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", default="libx264", help="any PyAV video encoder, e.g. libx264, mpeg4, libvpx")
    parser.add_argument("--container", default="mp4", help="file extension: mp4, avi, mkv, webm; png: frame folders")
    args = parser.parse_args(argv)
    if args.size % 2 or args.num_videos < 1 or args.seconds <= 0:
        raise SystemExit("--size must be even, --num-videos >= 1 and --seconds > 0")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    num_frames = round(args.seconds * args.fps)
    for index in range(args.num_videos):
        frames = make_video(args.seed, args.variant, index, num_frames, args.fps, args.size)
        if args.container == "png":
            write_frames(str(out / f"{args.variant}_{index:05d}_frames"), frames)
        else:
            write_video(str(out / f"{args.variant}_{index:05d}.{args.container}"), frames, args.fps, args.codec)
    print(f"wrote {args.num_videos} {args.variant} videos of {num_frames} frames ({args.codec}) to {out}")


if __name__ == "__main__":
    main()
