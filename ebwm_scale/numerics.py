"""Numeric helpers shared by the models and the MCMC core."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reductions in fp32 under bf16; float64 stays float64 (gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
