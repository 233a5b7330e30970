"""The MCMC refinement loop: gradient descent on the learned energy, differentiated through (seed pseudocode).

    for each step:
        pred   = pred.detach()                                   # no gradient through earlier steps
        energy = model(ctx, pred)                                # (B, S)
        grad   = autograd.grad(energy.sum(), pred, create_graph) # second-order path to the parameters and alpha
        pred   = pred - alpha * grad
        loss  += recon(pred, target)

The gradient is taken with respect to the state itself (for text: the logits, through the softmax), so the update
is true gradient descent on E(state) and a small enough step never raises the energy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

EnergyFn = Callable[[torch.Tensor, int], torch.Tensor]  # (pred, step index) -> energy (B, S)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) -> scalar


@dataclass(kw_only=True)
class MCMCConfig:
    num_steps: int = 2
    alpha_init: float = 500.0
    learn_alpha: bool = True
    alpha_min: float = 1e-4  # the step size is clamped here so it can never flip sign
    alpha_lr_multiplier: float = 1500.0  # alpha's optimizer group runs at lr * this
    init_scale: float = 1.0  # pred starts as init_scale * randn
    langevin_noise_std: float = 0.0  # > 0: add N(0, std^2) to the state before every energy evaluation
    max_num_steps: int = 0  # > num_steps: each training batch draws its step count from [num_steps, max_num_steps]
    step_count_seed: int = 0  # the step-count draws; the same on every rank, so ranks run equal numbers of passes
    alpha_jitter: float = 0.0  # > 0: each step uses alpha * U(1 - jitter, 1 + jitter)
    loss_on: str = "all"  # all: mean of the loss after every step | last: the last step only

    def build(self) -> MCMC:
        return MCMC(self)


@dataclass
class RefineResult:
    pred: torch.Tensor
    losses: list[torch.Tensor] = field(default_factory=list)  # one scalar per step (empty without a loss_fn)
    energies: list[torch.Tensor] = field(default_factory=list)  # mean energy before each step, detached


def refine(
    energy_fn: EnergyFn,
    pred: torch.Tensor,
    alpha: torch.Tensor,
    num_steps: int,
    *,
    target: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    create_graph: bool = True,
    langevin_noise_std: float = 0.0,
    alpha_jitter: float = 0.0,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> RefineResult:
    """Refine `pred` by `num_steps` of gradient descent on the energy. Works under torch.no_grad() too."""
    result = RefineResult(pred=pred)
    with torch.enable_grad():
        for step in range(num_steps):
            pred = pred.detach()
            if langevin_noise_std > 0:  # Langevin dynamics: explore around the current state
                pred = pred + langevin_noise_std * noise_fn(pred)
            pred.requires_grad_(True)
            energy = energy_fn(pred, step)  # (B, S)
            (grad,) = torch.autograd.grad(energy.sum(), pred, create_graph=create_graph)
            # Released: the outer backward then stores no gradient for this leaf (nothing reads it), and the lean
            # vocabulary state skips computing it.
            pred.requires_grad_(False)
            step_alpha = alpha
            if alpha_jitter > 0:  # randomized step size
                step_alpha = alpha * (1 + alpha_jitter * (2 * torch.rand((), device=pred.device) - 1))
            pred = pred - step_alpha * grad
            result.energies.append(energy.detach().mean())
            if loss_fn is not None:
                result.losses.append(loss_fn(pred, target))
    result.pred = pred if create_graph else pred.detach()
    return result


class MCMC(nn.Module):
    """Owns the learnable step size alpha and the loop's options."""

    def __init__(self, cfg: MCMCConfig):
        super().__init__()
        self.cfg = cfg
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast views every parameter as bytes, which a
        # 0-dim tensor cannot do.
        self.alpha = nn.Parameter(torch.full((1,), float(cfg.alpha_init)), requires_grad=cfg.learn_alpha)
        # The step-count RNG lives in a buffer: checkpointed with the weights, and identical on every rank (sharded
        # engines need every rank to run the same number of forward/backward passes).
        generator = torch.Generator().manual_seed(cfg.step_count_seed)
        self.register_buffer("step_count_rng", generator.get_state())
        # Set by tensor parallelism when each rank refines a slice of the state: alpha's gradient is then the sum
        # of the slices' contributions (copy_to_tp: identity forward, all-reduce backward).
        self.state_split_group = None

    def step_size(self) -> torch.Tensor:
        alpha = self.alpha.clamp(min=self.cfg.alpha_min).squeeze(0)  # a scalar for the update
        if self.state_split_group is None:
            return alpha
        from ebwm_scale.parallel.tensor import copy_to_tp

        return copy_to_tp(alpha, self.state_split_group)

    def sample_num_steps(self) -> int:
        """Randomized step count, from the module's own RNG state (see __init__)."""
        if self.cfg.max_num_steps <= self.cfg.num_steps:
            return self.cfg.num_steps
        generator = torch.Generator()
        generator.set_state(self.step_count_rng.cpu())
        num_steps = int(torch.randint(self.cfg.num_steps, self.cfg.max_num_steps + 1, (), generator=generator))
        self.step_count_rng.copy_(generator.get_state())
        return num_steps

    def train_refine(
        self,
        energy_fn: EnergyFn,
        pred: torch.Tensor,
        target: torch.Tensor,
        loss_fn: LossFn,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ):
        """Training: random step count, noise and jitter as configured; returns the result and the loss."""
        result = refine(
            energy_fn,
            pred,
            self.step_size(),
            self.sample_num_steps(),
            target=target,
            loss_fn=loss_fn,
            create_graph=True,
            langevin_noise_std=self.cfg.langevin_noise_std,
            alpha_jitter=self.cfg.alpha_jitter,
            noise_fn=noise_fn,
        )
        if self.cfg.loss_on == "last":
            return result, result.losses[-1]
        return result, torch.stack(result.losses).mean()
