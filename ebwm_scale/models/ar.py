"""Transformer++ autoregressive baselines built from the same blocks as the EBT (docs/design.md §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ebwm_scale.models.blocks import RMSNorm, Transformer, init_weights

if TYPE_CHECKING:
    from ebwm_scale.models.config import ModelConfig


class AR(nn.Module):
    """Shared core: embed -> causal blocks -> norm -> output head. A pipeline stage runs `trunk` on its own
    range of layers; the first stage embeds, the last reads out."""

    cfg: ModelConfig
    transformer: Transformer
    output: nn.Linear

    def trunk(self, h: torch.Tensor, layers: range) -> torch.Tensor:
        return self.transformer.blocks(h, torch.arange(h.shape[1], device=h.device), None, layers)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.transformer.norm(h))


class ARText(AR):
    """tokens (B, S) -> next-token logits (B, S, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.transformer = Transformer(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.trunk(self.embed(tokens), range(self.cfg.num_layers)))  # (B, S, V)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)  # (B, S, D)


class ARFrames(AR):
    """frame embeddings (B, S, F) -> predicted next frame embeddings (B, S, F)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.frame_in = nn.Linear(cfg.frame_dim, cfg.dim, bias=False)
        self.frame_in_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.transformer = Transformer(cfg)
        self.output = nn.Linear(cfg.dim, cfg.frame_dim, bias=False)
        init_weights(self, cfg.init)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.readout(self.trunk(self.embed(frames), range(self.cfg.num_layers)))  # (B, S, F)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frame_in_norm(self.frame_in(frames))  # (B, S, D)
