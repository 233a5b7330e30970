"""Transformer++ autoregressive baselines built from the same blocks as the EBT (DESIGN §3)."""

from __future__ import annotations

import torch
from torch import nn

from ebwm_scale.models.blocks import RMSNorm, Transformer, init_weights
from ebwm_scale.models.config import ModelConfig


class ARText(nn.Module):
    """tokens (B, S) -> next-token logits (B, S, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.transformer = Transformer(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)  # (B, S, D)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.output(self.transformer(h, positions, mask=None))  # (B, S, V)


class ARFrames(nn.Module):
    """frame embeddings (B, S, F) -> predicted next frame embeddings (B, S, F)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.frame_in = nn.Linear(cfg.frame_dim, cfg.dim, bias=False)
        self.frame_in_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.transformer = Transformer(cfg)
        self.output = nn.Linear(cfg.dim, cfg.frame_dim, bias=False)
        init_weights(self)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.frame_in_norm(self.frame_in(frames))  # (B, S, D)
        positions = torch.arange(frames.shape[1], device=frames.device)
        return self.output(self.transformer(h, positions, mask=None))  # (B, S, F)
