"""Training FLOPs per token, pinned so that every run, ladder and benchmark counts the same way (DESIGN §2).

AR (PaLM appendix B accounting): 6 N + 12 L D S per token, with N the non-embedding parameters (matmul weights,
output head included) and the second term the attention score/value matmuls.

EBT: one MCMC step costs EBT_STEP_FLOPS_OVER_AR = 10/3 times an AR training step at equal N and tokens (the
official EBT accounting: a forward over 2S positions, the backward for the energy gradient, and the outer backward
through both); K steps cost K times that. This is the paper's count, kept for every compute axis so that results
compare with it; the "split" EBT layout computes the real stream once per batch and so does less work than this.
"""

from __future__ import annotations

from torch import nn

from ebwm_scale.models.blocks import count_params
from ebwm_scale.models.config import ModelConfig

EBT_STEP_FLOPS_OVER_AR = 10 / 3


def ar_train_flops_per_token(num_params: int, cfg: ModelConfig, seq_len: int) -> float:
    return 6 * num_params + 12 * cfg.num_layers * cfg.dim * seq_len


def train_flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int, num_mcmc_steps: int) -> float:
    """Training FLOPs per context token for `model` (an EBT when cfg.kind == "ebt")."""
    ar_flops = ar_train_flops_per_token(count_params(model, exclude_embeddings=True), cfg, seq_len)
    if cfg.kind == "ebt":
        return num_mcmc_steps * EBT_STEP_FLOPS_OVER_AR * ar_flops
    return ar_flops
