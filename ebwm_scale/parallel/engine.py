"""Training engines: how gradients are reduced and the optimizer is stepped, replicated or sharded.

The trainer talks to one interface: `module(batch)` (the objective), `backward(loss)` once per micro-batch,
`finish_step(skip)` once per optimizer step, `set_lr`, and optimizer state for checkpoints.

- DataParallelEngine (`parallel.data_parallel: ddp`): every rank holds everything; gradients are averaged after the
  outer backward, outside the double-backward graph, so the EBT's second-order gradients are exact.
- DeepSpeedEngine (`parallel.data_parallel: zero`): DeepSpeed ZeRO stage 0/1/2. DeepSpeed's backward hooks fire on
  the outer backward only (the energy gradient is taken with autograd.grad, which touches no parameter .grad), which
  is why stages 0-2 train the EBT correctly. Stage 3 re-partitions parameters between the forward and the second-order
  pass ("mat2 must be a matrix", DESIGN §4) and is refused until its fix lands.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from ebwm_scale.parallel.dist import DistInfo, all_reduce_gradients
from ebwm_scale.train.optim import set_lr

STEPS_PER_PRINT_NEVER = 2**62


class DataParallelEngine:
    optimizer_state_is_sharded = False
    can_skip_steps = True
    checkpoint_safe_globals: list = []

    def __init__(
        self,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        dist: DistInfo,
        grad_clip: float,
        grad_accum_steps: int,
    ):
        self.module = objective
        self.optimizer = optimizer
        self.dist = dist
        self.grad_clip = grad_clip
        self.grad_accum_steps = grad_accum_steps
        self.params = [p for p in objective.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def finish_step(self, skip: bool) -> float:
        """Average, clip and apply the accumulated gradients (unless skip, or the gradient is not finite); returns
        the global gradient norm before clipping (nan when skipped without one)."""
        all_reduce_gradients(self.params, self.dist.world_size)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")))
        if not skip and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def deepspeed_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config implied by the recipe, with parallel.deepspeed_config's extra keys merged in; a key the
    file sets differently from the recipe is an error naming both."""
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "elastic_checkpoint": False},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": STEPS_PER_PRINT_NEVER,
    }
    if not cfg.parallel.deepspeed_config:
        return generated
    with open(cfg.parallel.deepspeed_config) as f:
        user = json.load(f)

    def merge(ours: dict, theirs: dict, prefix: str) -> dict:
        merged = dict(ours)
        for key, value in theirs.items():
            if isinstance(value, dict) and isinstance(ours.get(key), dict):
                merged[key] = merge(ours[key], value, f"{prefix}{key}.")
            elif key in ours and ours[key] != value and key != "steps_per_print":
                raise ValueError(
                    f"{cfg.parallel.deepspeed_config} sets {prefix}{key}={value!r} but the recipe implies "
                    f"{ours[key]!r}; change the recipe (data.micro_batch_size, train.grad_accum_steps, "
                    "optim.grad_clip, parallel.zero_stage, train.precision) instead"
                )
            else:
                merged[key] = value
        return merged

    return merge(generated, user, "")


def _deepspeed_safe_globals() -> list:
    """The plain data classes a ZeRO optimizer state holds, allowed through torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine:
    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
        import deepspeed

        self.stage = config["zero_optimization"]["stage"]
        self.optimizer_state_is_sharded = self.stage > 0
        # Gradients are already reduced into the optimizer's partitions when a bad loss shows: no clean skip.
        self.can_skip_steps = False
        self.checkpoint_safe_globals = _deepspeed_safe_globals()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=objective, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.engine
        self.grad_accum_steps = config["gradient_accumulation_steps"]
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self._micro += 1
        if self._micro < self.grad_accum_steps:
            self.engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary

    def finish_step(self, skip: bool) -> float:
        assert not skip, "the trainer stops instead of skipping when can_skip_steps is False"
        self._micro = 0
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        if self.stage == 0:
            self.optimizer.load_state_dict(state)
        else:
            # ZeRO reads entry [dp rank] of a per-rank list; with a rigid (non-elastic) layout and the world size
            # unchanged (the checkpoint enforces it) this rank's own partition is all it needs.
            world_size = self.engine.dp_world_size
            self.optimizer.load_state_dict([state] * world_size, load_from_fp32_weights=True)


def build_engine(cfg, objective: nn.Module, dist: DistInfo):
    optimizer = cfg.optim.build(objective, cfg.mcmc.alpha_lr_multiplier)
    if cfg.parallel.data_parallel == "zero":
        return DeepSpeedEngine(objective, optimizer, deepspeed_config(cfg, dist.world_size))
    return DataParallelEngine(objective, optimizer, dist, cfg.optim.grad_clip, cfg.train.grad_accum_steps)
