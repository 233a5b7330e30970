"""Frame encoders: RGB frames -> one latent per frame, the state an EBT/AR video model predicts (docs/design.md §1).

Every encoder maps (N, H, W, 3) uint8 frames at `resolution` x `resolution` to (N, dim) float32 latents, records in
`describe()` what rebuilds it (written to meta.json by the video prep job), and decodes latents back to frames for
looking at predictions.

- patch_dct (default, no download): the per-channel mean of every patch, centred, then the `latent_dim`
  lowest-frequency coefficients of its 2-D DCT (an orthonormal basis, lowest frequencies first, the 3 channels of
  each frequency together). Decoding inverts it with the dropped coefficients at zero: a blurred frame at patch
  resolution (exact when latent_dim is the patch count x 3).
- sd_vae: the Stable Diffusion VAE the official EBT video code uses (diffusers AutoencoderKL; 4 x 28 x 28 latents at
  224 x 224), loaded only from a local directory (`vae_path`); nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

ENCODERS = ("patch_dct", "sd_vae")


@dataclass(kw_only=True)
class FrameEncoderConfig:
    kind: str = "patch_dct"
    resolution: int = 64  # frames are resized (shorter side) and centre-cropped to this square
    patch_size: int = 8  # patch_dct
    latent_dim: int = 64  # patch_dct
    vae_path: str = ""  # sd_vae: a local directory holding a diffusers AutoencoderKL (config.json + weights)
    device: str = "cpu"  # where the encoder runs (not part of what it computes)

    def describe(self) -> dict[str, Any]:
        """What determines the latents (meta.json, the prep job's settings)."""
        keep = {"patch_dct": ("resolution", "patch_size", "latent_dim"), "sd_vae": ("resolution",)}
        described = {"kind": self.kind, **{k: v for k, v in asdict(self).items() if k in keep[self.kind]}}
        if self.kind == "sd_vae":
            described["vae"] = os.path.basename(os.path.normpath(self.vae_path))
        return described

    def build(self) -> PatchDCT | SDVAE:
        if self.kind == "patch_dct":
            return PatchDCT(self)
        if self.kind == "sd_vae":
            return SDVAE(self)
        raise ValueError(f"frame encoder {self.kind!r} is not one of {', '.join(ENCODERS)}")


def dct_basis(size: int) -> np.ndarray:
    """(size, size) orthonormal DCT-II matrix: row k is frequency k."""
    n = np.arange(size)
    basis = np.sqrt(2 / size) * np.cos(np.pi * (n[None, :] + 0.5) * n[:, None] / size)
    basis[0] /= np.sqrt(2)
    return basis


class PatchDCT:
    def __init__(self, cfg: FrameEncoderConfig):
        if cfg.resolution % cfg.patch_size:
            raise ValueError(f"patch size {cfg.patch_size} does not divide the resolution {cfg.resolution}")
        self.cfg = cfg
        self.grid = cfg.resolution // cfg.patch_size
        features = self.grid * self.grid * 3
        if not 0 < cfg.latent_dim <= features:
            raise ValueError(f"latent_dim must lie in [1, {features}] (patches x channels), got {cfg.latent_dim}")
        basis = dct_basis(self.grid)
        frequencies = sorted(((u, v) for u in range(self.grid) for v in range(self.grid)), key=lambda f: (sum(f), f))
        columns = []  # one basis image per kept coefficient, as a (grid, grid, 3) array flattened
        for u, v in frequencies:
            for channel in range(3):
                image = np.zeros((self.grid, self.grid, 3))
                image[:, :, channel] = np.outer(basis[u], basis[v])
                columns.append(image.reshape(-1))
        self.projection = np.stack(columns[: cfg.latent_dim], axis=1).astype(np.float32)  # (features, dim)
        self.dim = cfg.latent_dim
        self.id = f"patch_dct-{cfg.resolution}px-p{cfg.patch_size}-d{cfg.latent_dim}"

    def encode(self, frames: np.ndarray) -> np.ndarray:
        n, p = len(frames), self.cfg.patch_size
        pixels = frames.astype(np.float32) / 255.0 - 0.5
        patches = pixels.reshape(n, self.grid, p, self.grid, p, 3).mean(axis=(2, 4))  # (N, g, g, 3)
        return patches.reshape(n, -1) @ self.projection

    def decode(self, latents: np.ndarray) -> np.ndarray:
        patches = (latents.astype(np.float32) @ self.projection.T).reshape(len(latents), self.grid, self.grid, 3)
        pixels = np.repeat(np.repeat(patches + 0.5, self.cfg.patch_size, axis=1), self.cfg.patch_size, axis=2)
        return (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)


class SDVAE:
    BATCH = 16

    def __init__(self, cfg: FrameEncoderConfig):
        if not cfg.vae_path or not os.path.isfile(os.path.join(cfg.vae_path, "config.json")):
            raise FileNotFoundError(
                f"frame encoder sd_vae needs vae_path, a local directory with a diffusers AutoencoderKL "
                f"(config.json + weights), got {cfg.vae_path!r}; nothing is downloaded at run time"
            )
        from diffusers import AutoencoderKL

        self.cfg = cfg
        self.vae = AutoencoderKL.from_pretrained(cfg.vae_path, local_files_only=True).to(cfg.device).eval()
        config = self.vae.config
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        if cfg.resolution % self.downsample:
            raise ValueError(f"the VAE downsamples by {self.downsample}, which must divide {cfg.resolution}")
        self.latent_shape = (
            config.latent_channels,
            cfg.resolution // self.downsample,
            cfg.resolution // self.downsample,
        )
        self.scaling = float(config.scaling_factor)
        self.dim = int(np.prod(self.latent_shape))
        self.id = f"sd_vae-{cfg.describe()['vae']}-{cfg.resolution}px"

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(frames), self.BATCH):
            batch = torch.from_numpy(frames[start : start + self.BATCH]).to(self.cfg.device)
            pixels = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            latents = self.vae.encode(pixels).latent_dist.mean * self.scaling  # the mean: deterministic
            out.append(latents.flatten(1).float().cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(latents), self.BATCH):
            batch = torch.from_numpy(latents[start : start + self.BATCH]).float().to(self.cfg.device)
            pixels = self.vae.decode(batch.view(-1, *self.latent_shape) / self.scaling).sample
            out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)


def encoder_from_meta(described: dict[str, Any], vae_path: str = "") -> PatchDCT | SDVAE:
    """The encoder a dataset was made with, from meta.json's record (sd_vae needs the local VAE again)."""
    fields = {k: v for k, v in described.items() if k in FrameEncoderConfig.__dataclass_fields__}
    return FrameEncoderConfig(**fields, vae_path=vae_path).build()
