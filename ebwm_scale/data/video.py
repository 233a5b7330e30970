"""Synthetic video for offline runs: discs bouncing in a box, rendered to frames and pooled to frame embeddings.

Every clip is a pure function of (seed, split, clip index), so any machine regenerates the same data. The frame
"encoder" here is mean-pooling over patches (a fixed, download-free encoder); the pluggable encoders of the video
prep pipeline produce the same sample schema ({"frames": (T, F) float32}).
"""

from __future__ import annotations

import numpy as np

SPLIT_IDS = {"train": 0, "val": 1}


def bounce(start: np.ndarray, velocity: np.ndarray, times: np.ndarray, low: np.ndarray, high: np.ndarray):
    """Positions (T, n) of points moving at constant velocity and reflecting off the walls [low, high]."""
    span = high - low  # (n,)
    unfolded = (start - low + velocity * times[:, None]) % (2 * span)  # (T, n)
    return low + np.where(unfolded < span, unfolded, 2 * span - unfolded)


def render_clip(rng: np.random.Generator, num_frames: int, frame_size: int, max_objects: int) -> np.ndarray:
    """(T, H, W) float32 frames in [0, 1] of 1..max_objects discs with random radius, brightness and velocity."""
    num_objects = int(rng.integers(1, max_objects + 1))
    radius = rng.uniform(0.08, 0.16, num_objects) * frame_size
    brightness = rng.uniform(0.4, 1.0, num_objects)
    low, high = radius, frame_size - radius
    times = np.arange(num_frames, dtype=np.float64)
    xs = bounce(rng.uniform(low, high), rng.uniform(-2.0, 2.0, num_objects), times, low, high)  # (T, n)
    ys = bounce(rng.uniform(low, high), rng.uniform(-2.0, 2.0, num_objects), times, low, high)
    grid = np.arange(frame_size, dtype=np.float64) + 0.5
    dist2 = (grid[None, None, :, None] - xs[:, None, None, :]) ** 2 + (
        grid[None, :, None, None] - ys[:, None, None, :]
    ) ** 2
    discs = (dist2 <= radius**2) * brightness  # (T, H, W, n)
    return np.clip(discs.sum(-1), 0.0, 1.0).astype(np.float32)


def patch_mean_embeddings(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """(T, H, W) -> (T, (H/p)*(W/p)): the mean brightness of every p x p patch."""
    num_frames, height, width = frames.shape
    patches = frames.reshape(num_frames, height // patch_size, patch_size, width // patch_size, patch_size)
    return patches.mean(axis=(2, 4)).reshape(num_frames, -1)


class SyntheticVideoClips:
    """Map-style dataset of clips of T = seq_len + 1 frame embeddings, standardized to zero mean, unit variance."""

    def __init__(
        self, num_clips: int, seq_len: int, frame_size: int, patch_size: int, max_objects: int, seed: int, split: str
    ):
        self.frame_dim = (frame_size // patch_size) ** 2
        clips = np.empty((num_clips, seq_len + 1, self.frame_dim), dtype=np.float32)
        for index in range(num_clips):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
            frames = render_clip(rng, seq_len + 1, frame_size, max_objects)
            clips[index] = patch_mean_embeddings(frames, patch_size)
        self.clips = clips

    def standardize(self, mean: float, std: float) -> None:
        self.clips = (self.clips - mean) / std

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"frames": self.clips[index]}


def synthetic_video_splits(
    num_clips: int, num_val_clips: int, seq_len: int, frame_size: int, patch_size: int, max_objects: int, seed: int
) -> tuple[SyntheticVideoClips, SyntheticVideoClips]:
    """(train, val), both standardized with the train split's mean and std."""
    train = SyntheticVideoClips(num_clips, seq_len, frame_size, patch_size, max_objects, seed, "train")
    val = SyntheticVideoClips(num_val_clips, seq_len, frame_size, patch_size, max_objects, seed, "val")
    mean, std = float(train.clips.mean()), float(train.clips.std())
    for split in (train, val):
        split.standardize(mean, std)
    return train, val
