"""System-2 inference: an EBT refines each prediction by gradient descent on its energy, as long as that helps.

Thinking options (ThinkConfig): more MCMC steps than training used; best-of-N chains from different start noise,
keeping per position the chain with the lowest final energy; Langevin noise; and an adaptive early exit, where a
position stops once a step improves its energy by less than `early_exit_eps`. Every prediction comes with its final
energy (lower = the model finds it more plausible), the spread of the final energies across chains (an uncertainty
score) and the number of steps it used.

Generation appends one element at a time (a token, or a predicted frame for video rollouts). The real tokens' keys
and values are cached per layer (per step under the time-token conditioning, whose context stream depends on the
step), so each new token costs one position of the context stream instead of the whole sequence again;
`use_cache=False` recomputes everything (the reference the cache is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebwm_scale.core.mcmc import refine
from ebwm_scale.models import EBT
from ebwm_scale.models.ebt import EncodedContext


@dataclass(kw_only=True)
class ThinkConfig:
    num_steps: int = 0  # MCMC steps; 0: as many as training used
    best_of: int = 1  # chains per prediction, from different start noise
    langevin_noise_std: float = 0.0
    early_exit_eps: float = 0.0  # > 0: a position stops when a step lowers its energy by less than this


@dataclass
class Thought:
    pred: torch.Tensor  # (B, S, state) the chosen chain's final state (text: logits)
    energy: torch.Tensor  # (B, S) its final energy
    energy_spread: torch.Tensor  # (B, S) std of the final energies over the chains (0 with one chain)
    steps_used: torch.Tensor  # (B, S) gradient steps the chosen chain took at each position


def think(energy_fn, space, init: torch.Tensor, alpha: torch.Tensor, num_steps: int, cfg: ThinkConfig) -> Thought:
    """Refine `init` ((chains x B, S, state), chains stacked along dim 0) with the training loop's own step
    (mcmc.refine), then keep the chain with the lowest final energy per position."""
    result = refine(
        energy_fn,
        space,
        init,
        alpha,
        num_steps,
        create_graph=False,
        langevin_noise_std=cfg.langevin_noise_std,
        early_exit_eps=cfg.early_exit_eps,
        final_energy=True,
    )
    # refine sets all three when asked for the final energy
    assert result.final_energy is not None and result.pred is not None and result.steps_used is not None
    chains = cfg.best_of
    final = result.final_energy.view(chains, -1, *result.final_energy.shape[1:])  # (chains, B, S)
    pred = result.pred.view(chains, -1, *result.pred.shape[1:])
    best = final.argmin(dim=0)  # (B, S)
    pick = best[None, ..., None].expand(1, *best.shape, pred.shape[-1])
    return Thought(
        pred=pred.gather(0, pick)[0],
        energy=final.gather(0, best[None])[0],
        energy_spread=final.std(dim=0, unbiased=False),
        steps_used=result.steps_used.view(chains, *best.shape).gather(0, best[None])[0],
    )


def think_about(objective, context: EncodedContext, num_positions: int, num_steps: int, cfg: ThinkConfig) -> Thought:
    """Thinking about the last `num_positions` positions of an encoded context: its keys/values are computed once,
    then copied for the best_of chains, which start from fresh noise."""
    objective.model.cache_context(context, num_steps + 1)  # +1: the final score
    chains = context.repeat(cfg.best_of)
    init = objective.init_state(chains.embeddings[:, -num_positions:])
    alpha = objective.mcmc.step_size().detach()
    return think(objective.energy_fn(chains), objective.space, init, alpha, num_steps, cfg)


class Generator:
    """Next-element prediction and generation with a trained EBT objective (text or frames)."""

    def __init__(self, objective, cfg: ThinkConfig):
        if not isinstance(objective.model, EBT):
            raise ValueError("System-2 thinking needs an EBT; an AR model's prediction has no energy to refine")
        self.objective, self.model, self.cfg = objective.eval(), objective.model, cfg
        self.num_steps = cfg.num_steps or objective.mcmc.cfg.num_steps

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
