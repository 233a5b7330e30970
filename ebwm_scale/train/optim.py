"""AdamW with a separate parameter group for the MCMC step size, and the learning-rate schedules.

cosine: linear warmup, then cosine decay to lr * min_lr_ratio.
wsd (warmup-stable-decay): linear warmup, lr held constant, then a linear decay to lr * min_lr_ratio over the last
    decay_fraction of the steps. Until its decay starts, a run's schedule does not depend on its length, so one
    long run can be branched at several points and each branch decayed to its own data budget: a branch equals a
    run of that length from scratch (tested), at the cost of the decay steps alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ebwm_scale.schema import Choice, non_negative, positive


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"


class CosineStart(Choice):
    after_warmup = "after_warmup"
    last_warmup_step = "last_warmup_step"


class Floor(Choice):
    per_group = "per_group"
    shared = "shared"


class DecayedWeights(Choice):
    matrices = "matrices"
    all = "all"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.01  # AdamW's decoupled decay
    # what weight decay applies to: matrices (not norm gains) | all (every weight; official)
    decay: DecayedWeights = DecayedWeights.matrices
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator epsilon
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the decay's floor, as a fraction of the peak (see floor)
    schedule: Schedule = Schedule.cosine  # how the lr moves over the run (see the module docstring)
    # where the cosine counts from: after_warmup (the step after the warmup, which repeats the peak) | last_warmup_step
    # (the peak step, so the decay starts at once and reaches the floor on the run's last step; official)
    cosine_start: CosineStart = CosineStart.after_warmup
    # where each parameter group's decay ends: per_group (its own peak * min_lr_ratio; alpha's group peaks at
    # lr * mcmc.alpha_lr_multiplier) | shared (lr * min_lr_ratio for every group, alpha's too; official)
    floor: Floor = Floor.per_group
    decay_fraction: float = 0.2  # wsd: the share of the steps, at the end, over which the lr decays
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # One fused kernel per parameter group (CPU and CUDA); false: the multi-tensor foreach update. Fused is 3.9x
    # faster on CPU and beats a torch.compile'd step (tools/bench_compile.py, docs/benchmarks.md).
    fused: bool = True

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "optim", "lr")
        problems += non_negative(self, "optim", "weight_decay", "warmup_steps", "grad_clip")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"optim.decay_fraction={self.decay_fraction} must lie in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.cosine_start != "after_warmup" and self.schedule != "cosine":
            problems.append(f"optim.cosine_start={self.cosine_start} applies to optim.schedule=cosine only")
        return problems

    def build(self, objective: nn.Module, alpha_lr_multiplier: float = 1.0) -> torch.optim.AdamW:
        """Three groups: decayed weights (matrices, or every weight with decay=all), the rest such as norm gains (not
        decayed), alpha (own lr, never decayed).

        Each group carries `lr_multiplier`: the engine runs it at lr_at(step, ..., lr_multiplier) (Engine.set_lr).
        """
        decay, no_decay, alpha = [], [], []
        for name, param in objective.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("mcmc.alpha"):
                alpha.append(param)
            elif param.ndim >= 2 or self.decay == "all":
                decay.append(param)
            else:
                no_decay.append(param)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "lr_multiplier": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_multiplier": 1.0},
        ]
        if alpha:
            groups.append({"params": alpha, "weight_decay": 0.0, "lr_multiplier": alpha_lr_multiplier})
        betas = (self.betas[0], self.betas[1])  # problems() has checked there are two
        return torch.optim.AdamW(groups, lr=self.lr, betas=betas, eps=self.eps, fused=self.fused)


def lr_at(step: int, cfg: OptimConfig, max_steps: int, multiplier: float = 1.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` under cfg.schedule, of a parameter
    group that peaks at cfg.lr * multiplier. The defaults compute exactly lr_at(step) * multiplier."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps * multiplier
    floor = cfg.min_lr_ratio / multiplier if cfg.floor == "shared" else cfg.min_lr_ratio  # of the group's peak
    if cfg.schedule == "wsd":
        decay_start = wsd_decay_start(cfg, max_steps)
        progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
        return cfg.lr * (1 - (1 - floor) * progress) * multiplier
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    counted = step - cfg.warmup_steps + (1 if cfg.cosine_start == "last_warmup_step" else 0)
    progress = min(1.0, counted / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (floor + (1 - floor) * cosine) * multiplier


def wsd_decay_start(cfg: OptimConfig, max_steps: int) -> int:
    """The first step of a wsd run's decay: the last decay_fraction of its steps, never inside the warmup."""
    return max(cfg.warmup_steps, max_steps - max(1, round(cfg.decay_fraction * max_steps)))
