"""The System-1 recipe's init and learning-rate schedule against independent transcriptions of the official code
(alexiglad/EBT at 0ad3628), as recipes/official/*.yaml set them up:

    # model/ar_transformer.py:200-207 (model/ar_ebt_time_embed.py:331-338 alike): q, k and v are separate linears
    self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
    init_whole_model_weights(self.wq, args.weight_initialization, ...)  # then wk, then wv, the same
    # model/model_utils.py:320-321: weight_initialization "xavier"
    nn.init.xavier_normal_(m.weight)

    # base_model_trainer.py:353-355: one cosine, one eta_min for every parameter group
    cosine = CosineAnnealingLR(optimizer, T_max=max_scheduling_steps - warm_up_steps,
                               eta_min=peak_learning_rate / min_lr_scale)
    WarmUpCosineAnnealingLR(optimizer, warm_up_steps, warm_up_base_lr_divider, cosine)  # optimization.py:77-121
    # base_model_trainer.py:376-379: alpha's group at mcmc_step_size_lr_multiplier * peak_learning_rate

The schedule is transcribed as a torch LRScheduler (the official class with its default warm_up_base_lr_divider = -1,
train_model.py:555) over torch's own CosineAnnealingLR, and stepped once per optimizer step as Lightning does
('interval': 'step', base_model_trainer.py:363-366).
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ebwm_scale.config import load_config
from ebwm_scale.models.blocks import Attention, init_weights
from ebwm_scale.train.optim import OptimConfig, lr_at
from tests.conftest import tiny_model_config

OFFICIAL_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "official" / "ebt_nlp_small.yaml"


class OfficialWarmUpCosine(torch.optim.lr_scheduler.LRScheduler):
    """optimization.py:77-121 with warm_up_base_lr_divider = -1 (warm up from 0); the end-of-warmup hook left out."""

    def __init__(self, optimizer, warm_up_steps: int, cosine_scheduler):
        self.warm_up_steps = warm_up_steps
        self.cosine_scheduler = cosine_scheduler
        self.last_step = 0
        self.highest_lr = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer)  # steps once: the first optimizer step runs at last_step = 1

    def step(self):
        self.last_step += 1
        super().step()

    def get_lr(self):
        if self.warm_up_steps != 0 and self.last_step <= self.warm_up_steps:
            return [lr * (self.last_step / self.warm_up_steps) for lr in self.highest_lr]
        self.cosine_scheduler.step()
        return self.cosine_scheduler.get_last_lr()


def official_lrs(cfg: OptimConfig, alpha_lr_multiplier: float, max_steps: int) -> list[tuple[float, float]]:
    """(alpha's lr, the other weights' lr) at each optimizer step of the official code (max_scheduling_steps =
    max_steps, train_model.py:143-144), with the recipe's numbers."""
    alpha, other = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    groups = [{"params": [alpha], "lr": alpha_lr_multiplier * cfg.lr}, {"params": [other], "lr": cfg.lr}]
    optimizer = torch.optim.AdamW(groups)
    min_lr_scale = 1 / cfg.min_lr_ratio
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max_steps - cfg.warmup_steps, eta_min=cfg.lr / min_lr_scale
    )
    scheduler = OfficialWarmUpCosine(optimizer, cfg.warmup_steps, cosine)
    lrs = []
    for _ in range(max_steps):
        lrs.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]))
        optimizer.step()
        scheduler.step()
    return lrs


def _recipe_optim(warmup_steps: int) -> tuple[OptimConfig, float]:
    """The official recipe's optimizer section, with a warmup short enough to step through."""
    cfg = load_config(OFFICIAL_RECIPE)
    return dataclasses.replace(cfg.optim, warmup_steps=warmup_steps), cfg.mcmc.alpha_lr_multiplier


def test_official_init_draws_q_k_v_as_three_matrices():
    """Under model.init: official the fused (3D, D) q/k/v weight is three xavier-normal (D, D) matrices, each
    N(0, 2 / (D + D)) as the official wq, wk, wv (not the fused matrix's 2 / (D + 3D), 1 / sqrt(2) of that std)."""
    dim = 64
    attention = Attention(tiny_model_config(dim=dim, init="official"))
    torch.manual_seed(0)
    init_weights(attention, "official")
    torch.manual_seed(0)
    std = math.sqrt(2.0 / (dim + dim))  # xavier-normal: gain * sqrt(2 / (fan_in + fan_out)), gain 1
    official = torch.cat([torch.randn(dim, dim) * std for _ in ("wq", "wk", "wv")])
    torch.testing.assert_close(attention.wqkv.weight.detach(), official, rtol=1e-6, atol=0)


def test_last_warmup_step_starts_the_cosine_where_the_official_scheduler_does():
    """The other weights' lr at every step of a short official schedule; the default counts its cosine from the step
    after the warmup, which repeats the peak, so it runs one step behind."""
    cfg, multiplier = _recipe_optim(warmup_steps=10)
    assert cfg.cosine_start == "last_warmup_step"
    max_steps = 60
    official = [other for _, other in official_lrs(cfg, multiplier, max_steps)]
    ours = [lr_at(step, cfg, max_steps) for step in range(max_steps)]
    assert ours == pytest.approx(official, rel=1e-12)
    assert official[9] == pytest.approx(cfg.lr) and official[10] < cfg.lr  # the peak, once
    assert official[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # the floor on the last step
    default = dataclasses.replace(cfg, cosine_start="after_warmup")
    assert [lr_at(step, default, max_steps) for step in range(10, max_steps)] == pytest.approx(official[9:-1])


def test_shared_floor_anneals_alpha_to_the_official_floor():
    """alpha's group (lr x 1500) falls to the same floor as every group, lr / 10, as under the official scheduler; with
    floor: per_group it ends at its own peak / 10."""
    cfg, multiplier = _recipe_optim(warmup_steps=10)
    assert cfg.floor == "shared"
    max_steps = 60
    official = [alpha for alpha, _ in official_lrs(cfg, multiplier, max_steps)]
    ours = [lr_at(step, cfg, max_steps, multiplier) for step in range(max_steps)]
    assert ours == pytest.approx(official, rel=1e-12)
    assert official[9] == pytest.approx(1.8) and official[-1] == pytest.approx(1.2e-4)
    per_group = dataclasses.replace(cfg, floor="per_group")
    assert lr_at(max_steps - 1, per_group, max_steps, multiplier) == pytest.approx(0.18)
    # the whole recipe, 1M steps: alpha from 1.8 down to 1.2e-4 at its last step
    recipe, _ = _recipe_optim(warmup_steps=10000)
    assert lr_at(10000 - 1, recipe, 1000000, multiplier) == pytest.approx(1.8)
    assert lr_at(1000000 - 1, recipe, 1000000, multiplier) == pytest.approx(1.2e-4)
