"""The MCMC refinement loop: gradient descent on the learned energy, differentiated through (EBWM pseudocode).

    for each step:
        pred   = pred.detach()                                   # no gradient through earlier steps
        x      = point(pred)                                     # the variable E is differentiated in (spaces.py)
        energy = model(ctx, candidate(x))                        # (B, S)
        grad   = autograd.grad(energy.sum(), x, create_graph)    # second-order path to the parameters and alpha
        pred   = x - alpha * grad
        loss  += recon(pred, target)

`mcmc_step` is the only implementation of a step: training, evaluation, System-2 inference (more steps, best-of-N,
early exit: ebwm_scale/inference/think.py) and the pipeline schedule (which runs `energy_point` and `descend` around its
waves of stages) all call it. What the state is and how it descends (frames; tokens under the official probability
rule or the logit rule) comes from the state space (ebwm_scale/core/spaces.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ebwm_scale.core.spaces import FrameSpace, Point, TokenSpace, UpdateSpace, VocabState
from ebwm_scale.schema import Choice, non_negative, positive

EnergyFn = Callable[[torch.Tensor, int], torch.Tensor]  # (candidate embedding (B, S, D), step index) -> (B, S)
StateSpace = FrameSpace | TokenSpace


class LossOn(Choice):
    all = "all"
    last = "last"


@dataclass(kw_only=True)
class MCMCConfig:
    num_steps: int = 2  # gradient steps on the energy per training batch (K)
    alpha_init: float = 500.0  # the MCMC step size alpha at the start
    learn_alpha: bool = True  # alpha is a trained parameter (else fixed)
    alpha_min: float = 1e-4  # the step size is clamped here so it can never flip sign
    alpha_lr_multiplier: float = 1500.0  # alpha's optimizer group runs at lr * this
    init_scale: float = 1.0  # pred starts as init_scale * randn
    langevin_noise_std: float = 0.0  # > 0: add N(0, std^2) to the state before every energy evaluation
    max_num_steps: int = 0  # > num_steps: each training batch draws its step count from [num_steps, max_num_steps]
    step_count_seed: int = 0  # the step-count draws; the same on every rank, so ranks run equal numbers of passes
    alpha_jitter: float = 0.0  # > 0: each step uses alpha * U(1 - jitter, 1 + jitter)
    loss_on: LossOn = LossOn.all  # all: mean of the loss after every step | last: the last step only
    # Text: "probs" is the official rule (step from softmax(s) with the gradient w.r.t. the probabilities);
    # "logits" differentiates through the softmax and steps the logits (needs its own alpha and noise).
    update_space: UpdateSpace = UpdateSpace.probs
    # Text: "lean" runs the B x S x V state through fused, chunked Functions (ebwm_scale/core/vocab_kernels.py); "plain"
    # is the autograd reference. Same numbers.
    vocab_state: VocabState = VocabState.lean

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "mcmc", "num_steps")
        problems += non_negative(self, "mcmc", "langevin_noise_std", "alpha_jitter", "init_scale")
        if self.max_num_steps and self.max_num_steps < self.num_steps:
            problems.append(f"mcmc.max_num_steps={self.max_num_steps} is below mcmc.num_steps={self.num_steps}")
        if not self.alpha_init > self.alpha_min > 0:
            problems.append(f"mcmc.alpha_init={self.alpha_init} must exceed mcmc.alpha_min={self.alpha_min} > 0")
        return problems

    def build(self) -> MCMC:
        return MCMC(self)


@dataclass
class RefineResult:
    pred: torch.Tensor | None  # the final state
    losses: list[torch.Tensor] = field(default_factory=list)  # one scalar per step (with a target)
    energies: list[torch.Tensor] = field(default_factory=list)  # (B, S) before each step, detached
    final_energy: torch.Tensor | None = None  # (B, S) after the last step (final_energy=True)
    steps_used: torch.Tensor | None = None  # (B, S) steps each position took (fewer under early exit)


def energy_point(space: StateSpace, pred: torch.Tensor, langevin_noise_std: float = 0.0) -> Point:
    """The first half of a step: noise, and the point the energy is differentiated at, a fresh leaf of the state (no
    gradient through earlier steps)."""
    if langevin_noise_std > 0:  # Langevin dynamics: explore around the current state
        pred = pred.detach() + langevin_noise_std * space.noise(pred)
    return space.point(pred)


def descend(
    space: StateSpace, point: Point, grad: torch.Tensor, alpha: torch.Tensor, alpha_jitter: float = 0.0
) -> torch.Tensor:
    """The second half: gradient descent on the energy with step size alpha (randomized by `alpha_jitter`)."""
    if point.wrt.is_leaf:
        # Released: the outer backward then stores no gradient for this leaf (nothing reads it), and the lean
        # vocabulary state skips computing it.
        point.wrt.requires_grad_(False)
    if alpha_jitter > 0:  # randomized step size
        alpha = alpha * (1 + alpha_jitter * (2 * torch.rand((), device=alpha.device) - 1))
    return space.descend(point, grad, alpha)


def mcmc_step(
    energy_fn: EnergyFn,
    space: StateSpace,
    pred: torch.Tensor,
    alpha: torch.Tensor,
    step: int,
    *,
    create_graph: bool,
    langevin_noise_std: float = 0.0,
    alpha_jitter: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of gradient descent on the energy: (the new state, the energy (B, S) before it, detached)."""
    with torch.enable_grad():
        point = energy_point(space, pred, langevin_noise_std)
        energy = energy_fn(point.candidate, step)  # (B, S)
        (grad,) = torch.autograd.grad(energy.sum(), point.wrt, create_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        return descend(space, point, grad, alpha, alpha_jitter), energy.detach()


def refine(
    energy_fn: EnergyFn,
    space: StateSpace,
    pred: torch.Tensor,
    alpha: torch.Tensor,
    num_steps: int,
    *,
    target: torch.Tensor | None = None,
    create_graph: bool = True,
    langevin_noise_std: float = 0.0,
    alpha_jitter: float = 0.0,
    early_exit_eps: float = 0.0,
    final_energy: bool = False,
) -> RefineResult:
    """Refine `pred` by `num_steps` of gradient descent on the energy. With a target, the loss after every step.
    create_graph=False: inference, nothing is kept for a backward. early_exit_eps > 0: a position stops once a step
    lowers its energy by less than this. final_energy: also score the final state (best-of-N picks by it)."""
    # pred is only set at the end: holding the start state would keep one more B x S x V tensor alive all along
    steps_used = torch.zeros(pred.shape[:-1], device=pred.device)
    result = RefineResult(pred=None, steps_used=steps_used)
    active = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device)
    if not create_graph:
        alpha = alpha.detach()
    for step in range(num_steps):
        new, energy = mcmc_step(
            energy_fn,
            space,
            pred,
            alpha,
            step,
            create_graph=create_graph,
            langevin_noise_std=langevin_noise_std,
            alpha_jitter=alpha_jitter,
        )
        if early_exit_eps > 0 and result.energies:  # adaptive exit: positions whose last step gained too little
            active &= result.energies[-1] - energy >= early_exit_eps
            if not active.any():
                break
            new = torch.where(active[..., None], new, pred)
        result.energies.append(energy)
        steps_used += active
        pred = new if create_graph else new.detach()
        if target is not None:
            with torch.set_grad_enabled(create_graph):
                result.losses.append(space.loss(pred, target))
    result.pred = pred
    if final_energy:
        with torch.no_grad():
            result.final_energy = energy_fn(space.point(pred).candidate, num_steps)
    return result


class MCMC(nn.Module):
    """Owns the learnable step size alpha and the loop's options."""

    step_count_rng: torch.Tensor

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

    def step_size(self) -> torch.Tensor:
        return self.alpha.clamp(min=self.cfg.alpha_min).squeeze(0)  # a scalar for the update

    def sample_num_steps(self) -> int:
        """Randomized step count, from the module's own RNG state (see __init__)."""
        if self.cfg.max_num_steps <= self.cfg.num_steps:
            return self.cfg.num_steps
        generator = torch.Generator()
        generator.set_state(self.step_count_rng.cpu())
        num_steps = int(torch.randint(self.cfg.num_steps, self.cfg.max_num_steps + 1, (), generator=generator))
        self.step_count_rng.copy_(generator.get_state())
        return num_steps

    def train_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The training loss from the per-step losses: their mean, or the last one (mcmc.loss_on); the sum of
        loss_weights(cfg, len(losses)) times the losses, computed so that one process adds nothing to round-off."""
        return losses[-1] if self.cfg.loss_on == "last" else torch.stack(losses).mean()


def loss_weights(cfg: MCMCConfig, num_steps: int) -> list[float]:
    """Each step's weight in the training loss (MCMC.train_loss): the pipeline schedule back-propagates each step's
    loss on its own, with this weight."""
    if cfg.loss_on == "last":
        return [0.0] * (num_steps - 1) + [1.0]
    return [1.0 / num_steps] * num_steps
