"""System-2 inference: an EBT refines each prediction by gradient descent on its energy, as long as that helps.

Thinking options (ThinkConfig; the official "advanced inference", alexiglad/EBT model/nlp/ebt.py
`ebt_advanced_inference`, through the training loop's own step, core/mcmc.py `refine`):
- the schedule: by default the trained one (each landscape its most steps, `MCMCConfig.eval_schedule`); or `num_steps`
  steps, step k on landscape k (later steps on the last trained one); or `steps_per_landscape` steps on every trained
  landscape, or on the final one only (`final_landscape_only`; official --infer_ebt_num_steps,
  --infer_steps_final_landscape);
- `alpha`: the step size overridden by a factor (< 1) or an absolute value (>= 1), optionally on the final landscape
  only (--infer_ebt_override_alpha, --infer_alpha_final_landscape);
- Langevin noise, on every step or the first only (--infer_langevin_dynamics_noise, --infer_langevin_first_step);
- steps kept only where they lower the energy (--infer_accept_lower_energies);
- best-of-N chains from different start noise, keeping per position the chain with the lowest final energy, the
  highest, or the largest drop from its first energy (--infer_generated_samples, --infer_energy_sampling_technique);
- an adaptive early exit, where a position stops once a step improves its energy by less than `early_exit_eps`.
Every prediction comes with its final energy (lower = the model finds it more plausible), the spread of the final
energies across chains (an uncertainty score) and the number of steps it used.

Generation appends one element at a time (a token, or a predicted frame for video rollouts). The real tokens' keys
and values are cached per layer (per step under the time-token conditioning, whose context stream depends on the
step), so each new token costs one position of the context stream instead of the whole sequence again;
`use_cache=False` recomputes everything (the reference the cache is tested against).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ebwm_scale.core.mcmc import MCMCConfig, Steps, refine, schedule_of
from ebwm_scale.models import EBT
from ebwm_scale.models.ebt import EncodedContext
from ebwm_scale.schema import Choice


class Selection(Choice):
    """Which chain best-of-N keeps at each position."""

    min = "min"  # the lowest final energy
    max = "max"  # the highest final energy
    max_gap = "max_gap"  # the largest drop from the first energy to the final one


@dataclass(kw_only=True)
class ThinkConfig:
    num_steps: int = 0  # MCMC steps, step k on landscape k; 0: the trained schedule (or steps_per_landscape)
    steps_per_landscape: int = 0  # > 0: this many steps on each trained landscape (instead of num_steps)
    final_landscape_only: bool = False  # steps_per_landscape on the final landscape only, one step on the others
    best_of: int = 1  # chains per prediction, from different start noise
    select: Selection = Selection.min  # which chain best-of-N keeps per position
    alpha: float = 0.0  # > 0: the step size overridden: in (0, 1) a factor on the trained one, >= 1 the value
    alpha_final_landscape: bool = False  # the override on the final landscape only, the trained step size before
    langevin_noise_std: float = 0.0
    langevin_first_step: bool = False  # the noise on the first step only
    accept_lower_energy: bool = False  # a position takes a step only if it lowers its energy
    early_exit_eps: float = 0.0  # > 0: a position stops when a step lowers its energy by less than this

    def schedule(self, mcmc: MCMCConfig) -> Steps:
        """The steps (a count, or each step's landscape) for a model trained with `mcmc`."""
        if self.num_steps and self.steps_per_landscape:
            raise ValueError("give num_steps or steps_per_landscape, not both")
        if self.num_steps:
            return self.num_steps
        if not self.steps_per_landscape:
            return mcmc.eval_schedule()
        final = mcmc.num_steps - 1
        return [
            landscape
            for landscape in range(mcmc.num_steps)
            for _ in range(self.steps_per_landscape if landscape == final or not self.final_landscape_only else 1)
        ]

    def step_sizes(self, trained: torch.Tensor, steps: Steps, num_landscapes: int) -> torch.Tensor | list[torch.Tensor]:
        """The trained step size, or the override (per step when only the final of `num_landscapes` trained
        landscapes takes it; later steps of a count are on the final one)."""
        if self.alpha <= 0:
            return trained
        alpha = trained * self.alpha if self.alpha < 1 else torch.full_like(trained, self.alpha)
        if not self.alpha_final_landscape:
            return alpha
        return [alpha if landscape >= num_landscapes - 1 else trained for landscape in schedule_of(steps)]


@dataclass
class Thought:
    pred: torch.Tensor  # (B, S, state) the chosen chain's final state (text: logits)
    energy: torch.Tensor  # (B, S) its final energy
    energy_spread: torch.Tensor  # (B, S) std of the final energies over the chains (0 with one chain)
    steps_used: torch.Tensor  # (B, S) gradient steps the chosen chain took at each position


def think(
    energy_fn,
    space,
    init: torch.Tensor,
    alpha: torch.Tensor | Sequence[torch.Tensor],
    num_steps: Steps,
    cfg: ThinkConfig,
) -> Thought:
    """Refine `init` ((chains x B, S, state), chains stacked along dim 0) with the training loop's own step
    (mcmc.refine), then keep per position the chain that `cfg.select` picks."""
    result = refine(
        energy_fn,
        space,
        init,
        alpha,
        num_steps,
        create_graph=False,
        langevin_noise_std=cfg.langevin_noise_std,
        langevin_first_step=cfg.langevin_first_step,
        accept_lower_energy=cfg.accept_lower_energy,
        early_exit_eps=cfg.early_exit_eps,
        final_energy=True,
    )
    # refine sets all three when asked for the final energy
    assert result.final_energy is not None and result.pred is not None and result.steps_used is not None
    chains = cfg.best_of
    final = result.final_energy.view(chains, -1, *result.final_energy.shape[1:])  # (chains, B, S)
    pred = result.pred.view(chains, -1, *result.pred.shape[1:])
    if cfg.select == Selection.max_gap:
        best = (result.energies[0].view(final.shape) - final).argmax(dim=0)  # (B, S)
    else:
        best = final.argmax(dim=0) if cfg.select == Selection.max else final.argmin(dim=0)
    pick = best[None, ..., None].expand(1, *best.shape, pred.shape[-1])
    return Thought(
        pred=pred.gather(0, pick)[0],
        energy=final.gather(0, best[None])[0],
        energy_spread=final.std(dim=0, unbiased=False),
        steps_used=result.steps_used.view(chains, *best.shape).gather(0, best[None])[0],
    )


def think_about(objective, context: EncodedContext, num_positions: int, num_steps: Steps, cfg: ThinkConfig) -> Thought:
    """Thinking about the last `num_positions` positions of an encoded context for `num_steps` (a count, or each
    step's landscape): its keys/values are computed once, then copied for the best_of chains, which start from fresh
    noise."""
    # the landscapes the steps and the final score read (a count's final score is on the landscape after its last)
    objective.model.cache_context(context, num_steps + 1 if isinstance(num_steps, int) else max(num_steps) + 1)
    chains = context.repeat(cfg.best_of)
    init = objective.init_state(chains.embeddings[:, -num_positions:])
    alpha = cfg.step_sizes(objective.mcmc.step_size().detach(), num_steps, objective.mcmc.cfg.num_steps)
    return think(objective.energy_fn(chains), objective.space, init, alpha, num_steps, cfg)


class Generator:
    """Next-element prediction and generation with a trained EBT objective (text or frames)."""

    def __init__(self, objective, cfg: ThinkConfig):
        if not isinstance(objective.model, EBT):
            raise ValueError("System-2 thinking needs an EBT; an AR model's prediction has no energy to refine")
        self.objective, self.model, self.cfg = objective.eval(), objective.model, cfg
        self.num_steps = cfg.schedule(objective.mcmc.cfg)  # a count, or each step's landscape

    @torch.no_grad()
    def encode(self, context: torch.Tensor, past: EncodedContext | None = None) -> EncodedContext:
        """The real elements `context`, continuing `past` if given (its cached keys/values grow)."""
        if past is None:
            return self.model.encode_context(context)
        return self.model.extend_context(past, context)

    def predict_next(self, context: EncodedContext) -> Thought:
        """The element after the last real one, refined from start noise (best_of chains)."""
        return think_about(self.objective, context, 1, self.num_steps, self.cfg)

    def generate(
        self, context: torch.Tensor, num_new: int, temperature: float = 0.0, use_cache: bool = True
    ) -> tuple[torch.Tensor, list[Thought]]:
        """`context` (B, T) tokens or (B, T, F) frames, extended by `num_new` predictions. Text: greedy
        (temperature 0) or sampled from softmax(state / temperature); frames: the refined state itself."""
        encoded = self.encode(context)
        thoughts = []
        for _ in range(num_new):
            thought = self.predict_next(encoded)
            thoughts.append(thought)
            if self.model.cfg.modality == "text":
                logits = thought.pred[:, -1].float()
                if temperature > 0:
                    new = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)  # (B, 1)
                else:
                    new = logits.argmax(dim=-1, keepdim=True)
            else:
                new = thought.pred[:, -1:].to(context.dtype)  # (B, 1, F)
            context = torch.cat((context, new), dim=1)
            encoded = self.encode(new, encoded) if use_cache else self.encode(context)
        return context, thoughts
