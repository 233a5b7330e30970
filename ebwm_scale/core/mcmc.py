"""The MCMC refinement loop: gradient descent on the learned energy, differentiated through (EBWM pseudocode).

    for each step:
        pred   = pred.detach()                                   # no gradient through earlier steps
        x      = point(pred)                                     # the variable E is differentiated in (spaces.py)
        energy = model(ctx, candidate(x), landscape)             # (B, S)
        grad   = autograd.grad(energy.sum(), x, create_graph)    # second-order path to the parameters and alpha
        pred   = x - alpha * grad
        loss  += recon(pred, target)

System-2 training (the official --*mcmc* options of alexiglad/EBT, model/nlp/ebt.py `forward`) varies this loop:
- a schedule of steps over energy landscapes: `num_steps` landscapes (the step-conditioning index), each visited
  `steps_per_landscape` times, or a count drawn per batch up to `max_steps_per_landscape` (evaluation: the maximum);
- a step size drawn per (sequence, position) in [alpha / scale, alpha * scale] (`step_size_scale`), once per batch;
- Langevin noise added to the state before each step (`langevin_noise_std`);
- an undetached chain (`detach_chain: false`): the state keeps its graph from step to step, so alpha learns through
  every step; with `loss_on: last` only the last step's energy gradient is differentiated, the others are constants
  (--truncate_mcmc). A frozen alpha then gets nothing from the chain and the parameters' gradient is the detached
  chain's, so the chain is kept only when alpha learns (or when every step's loss counts);
- start states replayed from earlier batches (core/replay.py).

`mcmc_step` is the only implementation of a step: training, evaluation, System-2 inference (more steps, best-of-N,
steps kept only where they lower the energy, early exit: ebwm_scale/inference/think.py) and the pipeline schedule
(which runs `energy_point` and `descend` around its waves of stages) all call it. What the state is and how it
descends (frames; tokens under the official probability rule or the logit rule) comes from the state space
(ebwm_scale/core/spaces.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ebwm_scale.core.spaces import FrameSpace, Point, TokenSpace, UpdateSpace, VocabState
from ebwm_scale.schema import Choice, non_negative, positive

EnergyFn = Callable[[torch.Tensor, int], torch.Tensor]  # (candidate embedding (B, S, D), landscape) -> (B, S)
StateSpace = FrameSpace | TokenSpace
Steps = int | Sequence[int]  # a number of steps (step k on landscape k), or each step's landscape


class LossOn(Choice):
    all = "all"
    last = "last"


class ReplayDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"


class ReplayDevice(Choice):
    model = "model"  # where the model runs (the official buffer)
    cpu = "cpu"  # host memory (pinned when a GPU runs the model)


@dataclass(kw_only=True)
class ReplayConfig:
    """Start states replayed from earlier batches (the official --mcmc_replay_buffer; core/replay.py)."""

    size: int = 0  # sequences held per data-parallel rank (official: 192); 0: no replay
    sample_fraction: float = 0.5  # each training micro-batch appends int(micro-batch x this) stored sequences
    dtype: ReplayDtype = ReplayDtype.float32  # how stored states are kept (bfloat16: half the memory, rounded)
    device: ReplayDevice = ReplayDevice.model  # where stored states live: model (official) | cpu (host memory)

    def replayed(self, batch_size: int) -> int:
        """Stored sequences appended to a micro-batch of `batch_size` once the buffer holds them (0 without replay)."""
        return int(batch_size * self.sample_fraction) if self.size else 0

    def problems(self) -> list[str]:
        problems = non_negative(self, "mcmc.replay", "size")
        if not 0 < self.sample_fraction <= 1:
            problems.append(f"mcmc.replay.sample_fraction={self.sample_fraction} must lie in (0, 1]")
        return problems


@dataclass(kw_only=True)
class MCMCConfig:
    num_steps: int = 2  # gradient steps on the energy per training batch (K); the energy landscapes under repeats
    alpha_init: float = 500.0  # the MCMC step size alpha at the start
    learn_alpha: bool = True  # alpha is a trained parameter (else fixed)
    alpha_min: float = 1e-4  # the step size is clamped here so it can never flip sign
    alpha_lr_multiplier: float = 1500.0  # alpha's optimizer group runs at lr * this
    init_scale: float = 1.0  # pred starts as init_scale * randn
    langevin_noise_std: float = 0.0  # > 0: add N(0, std^2) to the state before every energy evaluation
    langevin_at_eval: bool = False  # the noise also when evaluating (the official code's default)
    max_num_steps: int = 0  # > num_steps: each training batch draws its step count from [num_steps, max_num_steps]
    steps_per_landscape: int = 1  # steps on each landscape (same step-conditioning index)
    max_steps_per_landscape: int = 0  # > steps_per_landscape: drawn per landscape and batch up to this; eval: this
    step_count_seed: int = 0  # the step-count draws; the same on every rank, so ranks run equal numbers of passes
    alpha_jitter: float = 0.0  # > 0: each step uses alpha * U(1 - jitter, 1 + jitter)
    step_size_scale: float = 1.0  # > 1: alpha drawn per (sequence, position) in [alpha / scale, alpha * scale]
    loss_on: LossOn = LossOn.all  # all: mean of the loss after every step | last: the last step only (truncated)
    detach_chain: bool = True  # false: the state keeps its graph between steps (official --no_mcmc_detach)
    # Text: "probs" is the official rule (step from softmax(s) with the gradient w.r.t. the probabilities);
    # "logits" differentiates through the softmax and steps the logits (needs its own alpha and noise).
    update_space: UpdateSpace = UpdateSpace.probs
    # Text: "lean" runs the B x S x V state through fused, chunked Functions (ebwm_scale/core/vocab_kernels.py); "plain"
    # is the autograd reference. Same numbers.
    vocab_state: VocabState = VocabState.lean
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "mcmc", "num_steps", "steps_per_landscape")
        problems += non_negative(self, "mcmc", "langevin_noise_std", "alpha_jitter", "init_scale")
        if self.max_num_steps and self.max_num_steps < self.num_steps:
            problems.append(f"mcmc.max_num_steps={self.max_num_steps} is below mcmc.num_steps={self.num_steps}")
        if self.max_steps_per_landscape and self.max_steps_per_landscape < self.steps_per_landscape:
            problems.append(
                f"mcmc.max_steps_per_landscape={self.max_steps_per_landscape} is below "
                f"mcmc.steps_per_landscape={self.steps_per_landscape}"
            )
        if self.max_num_steps > self.num_steps and self.max_steps_per_landscape > self.steps_per_landscape:
            problems.append(
                f"mcmc.max_num_steps={self.max_num_steps} and mcmc.max_steps_per_landscape="
                f"{self.max_steps_per_landscape} both randomize the step count: use one"
            )
        if self.step_size_scale < 1:
            problems.append(f"mcmc.step_size_scale={self.step_size_scale} must be >= 1 (1: no randomization)")
        if not self.alpha_init > self.alpha_min > 0:
            problems.append(f"mcmc.alpha_init={self.alpha_init} must exceed mcmc.alpha_min={self.alpha_min} > 0")
        return problems + self.replay.problems()

    @property
    def truncate(self) -> bool:
        """Only the last step's loss counts, so only its energy gradient is differentiated."""
        return self.loss_on == LossOn.last

    @property
    def keeps_chain(self) -> bool:
        """Whether an undetached chain changes any gradient: through alpha, or through every step's loss."""
        return not self.detach_chain and (self.learn_alpha or not self.truncate)

    def langevin_std(self, training: bool) -> float:
        """The Langevin noise of a training or an evaluation chain (mcmc.langevin_at_eval)."""
        return self.langevin_noise_std if training or self.langevin_at_eval else 0.0

    def min_steps(self) -> int:
        """The steps every training batch runs (the per-step metrics report these)."""
        return self.num_steps * self.steps_per_landscape

    def eval_schedule(self) -> list[int]:
        """Evaluation's landscape per step: each landscape its most steps (the official evaluation, no randomness)."""
        repeats = max(self.steps_per_landscape, self.max_steps_per_landscape)
        return [landscape for landscape in range(self.num_steps) for _ in range(repeats)]

    def build(self) -> MCMC:
        return MCMC(self)


@dataclass
class RefineResult:
    pred: torch.Tensor | None  # the final state
    losses: list[torch.Tensor] = field(default_factory=list)  # one scalar per step (with a target)
    energies: list[torch.Tensor] = field(default_factory=list)  # (B, S) before each step, detached
    final_energy: torch.Tensor | None = None  # (B, S) after the last step (final_energy=True)
    steps_used: torch.Tensor | None = None  # (B, S) steps each position took (fewer under early exit)


def schedule_of(steps: Steps) -> Sequence[int]:
    return range(steps) if isinstance(steps, int) else steps


def energy_point(
    space: StateSpace, pred: torch.Tensor, langevin_noise_std: float = 0.0, keep_chain: bool = False
) -> Point:
    """The first half of a step: the point the energy is differentiated at, a fresh leaf of the state (no gradient
    through earlier steps) or, when `keep_chain`, the state itself with its graph; with Langevin noise where the state
    space puts it (text: on the state, which keeps it; frames: on what the energy reads)."""
    return space.point(pred, keep_chain, langevin_noise_std)


def descend(
    space: StateSpace,
    point: Point,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    alpha_jitter: float = 0.0,
    grad_is_constant: bool = False,
) -> torch.Tensor:
    """The second half: gradient descent on the energy with step size alpha (a scalar, or (B, S, 1) per position;
    randomized by `alpha_jitter`). `grad_is_constant`: a step of a kept chain whose energy gradient was not
    differentiated, which must then bring the parameters no gradient either."""
    if point.wrt.is_leaf:
        # Released: the outer backward then stores no gradient for this leaf (nothing reads it), and the lean
        # vocabulary state skips computing it.
        point.wrt.requires_grad_(False)
    if alpha_jitter > 0:  # randomized step size
        alpha = alpha * (1 + alpha_jitter * (2 * torch.rand((), device=alpha.device) - 1))
    return space.descend(point, grad, alpha, grad_is_constant)


def mcmc_step(
    energy_fn: EnergyFn,
    space: StateSpace,
    pred: torch.Tensor,
    alpha: torch.Tensor,
    landscape: int,
    *,
    create_graph: bool,
    keep_chain: bool = False,
    langevin_noise_std: float = 0.0,
    alpha_jitter: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of gradient descent on the energy: (the new state, the energy (B, S) before it, detached).
    create_graph: the energy gradient is differentiated (training); keep_chain: the new state keeps its graph to
    `pred` and alpha even where the gradient is a constant."""
    with torch.enable_grad():
        point = energy_point(space, pred, langevin_noise_std, keep_chain)
        energy = energy_fn(point.candidate, landscape)  # (B, S)
        (grad,) = torch.autograd.grad(energy.sum(), point.wrt, create_graph=create_graph)
    with torch.set_grad_enabled(create_graph or keep_chain):
        new = descend(space, point, grad, alpha, alpha_jitter, grad_is_constant=not create_graph)
    return new, energy.detach()


def refine(
    energy_fn: EnergyFn,
    space: StateSpace,
    pred: torch.Tensor,
    alpha: torch.Tensor | Sequence[torch.Tensor],
    steps: Steps,
    *,
    target: torch.Tensor | None = None,
    create_graph: bool = True,
    truncate: bool = False,
    keep_chain: bool = False,
    langevin_noise_std: float = 0.0,
    langevin_first_step: bool = False,
    alpha_jitter: float = 0.0,
    accept_lower_energy: bool = False,
    early_exit_eps: float = 0.0,
    final_energy: bool = False,
) -> RefineResult:
    """Refine `pred` by gradient descent on the energy, one step per entry of `steps` (its landscape), or `steps`
    steps, with step size `alpha` (or one per step). With a target, the loss after every step. create_graph=False:
    inference, nothing is kept for a backward. truncate: only the last step's energy gradient is differentiated (the
    others' losses are metrics). keep_chain: the states keep their graph from step to step. langevin_first_step: the
    noise on the first step only. accept_lower_energy: a position takes a step only if it lowers its energy on that
    step's landscape (one more energy evaluation per step), else stays. early_exit_eps > 0: a position stops once a
    step lowers its energy by less than this. final_energy: also score the final state (best-of-N picks by it)."""
    schedule = schedule_of(steps)
    alphas = [alpha] * len(schedule) if isinstance(alpha, torch.Tensor) else list(alpha)
    if len(alphas) != len(schedule):
        raise ValueError(f"{len(alphas)} step sizes for {len(schedule)} steps")
    # pred is only set at the end: holding the start state would keep one more B x S x V tensor alive all along
    steps_used = torch.zeros(pred.shape[:-1], device=pred.device)
    result = RefineResult(pred=None, steps_used=steps_used)
    active = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device)
    if not create_graph:
        alphas, keep_chain = [a.detach() for a in alphas], False
    for index, landscape in enumerate(schedule):
        differentiated = create_graph and (not truncate or index == len(schedule) - 1)  # its loss counts
        new, energy = mcmc_step(
            energy_fn,
            space,
            pred,
            alphas[index],
            landscape,
            create_graph=differentiated,
            keep_chain=keep_chain,
            langevin_noise_std=0.0 if langevin_first_step and index > 0 else langevin_noise_std,
            alpha_jitter=alpha_jitter,
        )
        if accept_lower_energy:
            # A rejected position stays at pred; the official keeps its noised point instead, for text softmax(pred),
            # which the next step's softmax would flatten.
            with torch.no_grad():
                proposed = energy_fn(space.point(new).candidate, landscape)
            new = torch.where((proposed < energy)[..., None], new, pred)
        if early_exit_eps > 0 and result.energies:  # adaptive exit: positions whose last step gained too little
            active &= result.energies[-1] - energy >= early_exit_eps
            if not active.any():
                break
            new = torch.where(active[..., None], new, pred)
        result.energies.append(energy)
        steps_used += active
        pred = new if differentiated or keep_chain else new.detach()
        if target is not None:
            with torch.set_grad_enabled(differentiated):
                result.losses.append(space.loss(pred, target))
    result.pred = pred
    if final_energy:
        with torch.no_grad():
            last = schedule[-1] + 1 if isinstance(steps, int) else schedule[-1]
            result.final_energy = energy_fn(space.point(pred).candidate, last)
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

    def draw_step_sizes(self, rows: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """With a step_size_scale, a training batch's u ~ U(0, 1) per position, (B, S, 1), from the global RNG (the
        same on tensor-parallel ranks, which share their seed); else None."""
        if self.cfg.step_size_scale == 1:
            return None
        return torch.rand(*rows, 1, device=self.alpha.device, dtype=self.alpha.dtype)

    def step_size(self, draw: torch.Tensor | None = None) -> torch.Tensor:
        """The clamped alpha, a scalar; given a `draw` u, per position: alpha / scale + u (alpha * scale - alpha /
        scale). Each call is a graph of its own (pipeline micro-batches back-propagate theirs separately)."""
        alpha = self.alpha.clamp(min=self.cfg.alpha_min).squeeze(0)
        if draw is None:
            return alpha
        scale = self.cfg.step_size_scale
        low, high = alpha / scale, alpha * scale
        return low + draw * (high - low)

    def _draw(self, low: int, high: int) -> int:
        """An integer in [low, high] from the module's own RNG state (see __init__)."""
        generator = torch.Generator()
        generator.set_state(self.step_count_rng.cpu())
        value = int(torch.randint(low, high + 1, (), generator=generator))
        self.step_count_rng.copy_(generator.get_state())
        return value

    def sample_num_steps(self) -> int:
        """Randomized step count (mcmc.max_num_steps)."""
        if self.cfg.max_num_steps <= self.cfg.num_steps:
            return self.cfg.num_steps
        return self._draw(self.cfg.num_steps, self.cfg.max_num_steps)

    def sample_schedule(self) -> list[int]:
        """A training batch's landscape per step: the step count, then each landscape's repeats, drawn."""
        low, high = self.cfg.steps_per_landscape, self.cfg.max_steps_per_landscape
        schedule = []
        for landscape in range(self.sample_num_steps()):
            schedule += [landscape] * (self._draw(low, high) if high > low else low)
        return schedule

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
