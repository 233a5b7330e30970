"""Training engines: how gradients are reduced and the optimizer is stepped, replicated or sharded.

The trainer talks to the Engine contract only (engines/base.py). engines/data_parallel.py holds our own data
parallelism (DDP, ZeRO-1, FSDP2, and the pipeline engine over one stage); engines/deepspeed.py holds DeepSpeed's
ZeRO stages 0-3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import ARObjective, EBTObjective
from ebwm_scale.parallel.dist import DistInfo, ParallelConfig
from ebwm_scale.parallel.engines.base import Engine
from ebwm_scale.parallel.engines.data_parallel import DataParallelEngine, FSDPEngine, PipelineEngine
from ebwm_scale.parallel.engines.deepspeed import DeepSpeedEngine, DeepSpeedZero3Engine, deepspeed_config
from ebwm_scale.parallel.pipeline import pipeline_schedule
from ebwm_scale.parallel.zero import ShardedOptimizer

__all__ = ["DataParallelEngine", "DeepSpeedEngine", "DeepSpeedZero3Engine", "Engine", "FSDPEngine", "PipelineEngine"]


def build_engine(
    objective: EBTObjective | ARObjective,
    cfg: ParallelConfig,
    dist: DistInfo,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    mcmc: MCMCConfig,
) -> Engine:
    """The engine `cfg` asks for, over an objective that parallelize() has already cut. `make_optimizer` builds the
    optimizer over the parameters the engine holds (FSDP's are sharded ones); `mcmc`: the pipeline schedule runs the
    MCMC steps stage by stage."""
    if cfg.data_parallel == "fsdp":
        return FSDPEngine(objective, make_optimizer, dist, grad_clip, grad_accum_steps)
    optimizer: Any = make_optimizer(objective)  # AdamW, or our ZeRO-1 wrapper of it below
    if cfg.data_parallel == "zero":
        zero = DeepSpeedZero3Engine if cfg.zero_stage == 3 else DeepSpeedEngine
        config = deepspeed_config(
            cfg,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            grad_clip=grad_clip,
            world_size=dist.world_size,
        )
        return zero(objective, optimizer, config)
    if cfg.shard_optimizer and dist.dp_size > 1:
        optimizer = ShardedOptimizer(optimizer, dist.dp_group)
    if dist.pp_size > 1:
        schedule = pipeline_schedule(objective, dist, cfg.pipeline_microbatches, mcmc)
        return PipelineEngine(objective, optimizer, dist, grad_clip, grad_accum_steps, schedule)
    return DataParallelEngine(objective, optimizer, dist, grad_clip, grad_accum_steps)
