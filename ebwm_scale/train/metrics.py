"""Training FLOPs per token, pinned so that every run, ladder and benchmark counts the same way (docs/design.md §7).

AR (PaLM appendix B accounting): 6 N + 12 L D S per token, with N the non-embedding parameters (matmul weights,
output head included) and the second term the attention score/value matmuls.

EBT: one MCMC step costs EBT_STEP_FLOPS_OVER_AR = 10/3 times an AR training step at equal N and tokens (the
official EBT accounting: a forward over 2S positions, the backward for the energy gradient, and the outer backward
through both); K steps cost K times that. This is the paper's count, kept for every compute axis so that results
compare with it; the "split" EBT layout computes the real stream once per batch and so does less work than this.
"""

from __future__ import annotations

import resource

import torch
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


# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts). Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, override: float) -> float | None:
    """The device's peak TFLOP/s for MFU: the recipe's value if set, the table for known GPUs, else None (CPU)."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def model_state_gb_per_rank(num_params: int, precision: str, data_parallel: str, zero_stage: int, world: int) -> float:
    """Parameters + gradients + AdamW state per rank (the ZeRO paper's accounting; activations come on top).
    bf16: 2 B params, 2 B grads, 12 B fp32 master + moments; fp32: 4 + 4 + 8. ZeRO-1 shards the optimizer state,
    ZeRO-2 also the gradients, ZeRO-3 also the parameters."""
    params, grads, optimizer = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    stage = {"zero": zero_stage, "fsdp": 3}.get(data_parallel, 0)
    shard = [1.0, 1.0, 1.0]
    for index in range(stage):  # 1: optimizer, 2: + gradients, 3: + parameters
        shard[2 - index] = 1 / world
    return num_params * (params * shard[0] + grads * shard[1] + optimizer * shard[2]) / 2**30
