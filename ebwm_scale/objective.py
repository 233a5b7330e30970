"""Training objectives: a model plus its loss, as one nn.Module whose forward takes a batch and returns the loss.

A batch is a dict with "tokens" (B, S+1) int64 for text or "frames" (B, S+1, F) float for frames; the first S
elements are the context and the last S the targets. Wrapping model and loss in one module (with alpha inside)
lets DeepSpeed or any other engine treat the whole thing as one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ebwm_scale.mcmc import MCMC, RefineResult, refine
from ebwm_scale.models import EBT
from ebwm_scale.models.blocks import at_least_fp32
from ebwm_scale.models.vocab_state import lean_cross_entropy


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    metrics: dict[str, torch.Tensor]  # detached scalars for logging


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    seq = batch["tokens"] if "tokens" in batch else batch["frames"]
    return seq[:, :-1], seq[:, 1:]  # context (B, S, ...), target (B, S, ...)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, lean: bool = True) -> torch.Tensor:
    """Cross-entropy for token targets (pred: logits), SmoothL1(beta=1) for frame targets (DESIGN §2, §3).
    `lean`: the chunked cross-entropy that saves the logits instead of fp32 log-probabilities (vocab_state.py)."""
    if target.dtype == torch.long:
        if lean:
            return lean_cross_entropy(pred.flatten(0, 1), target.flatten())
        return F.cross_entropy(at_least_fp32(pred).flatten(0, 1), target.flatten())
    return F.smooth_l1_loss(at_least_fp32(pred), target.to(at_least_fp32(pred).dtype), beta=1.0)


def loss_for(model: nn.Module):
    """The model's reconstruction loss, with the cross-entropy its `model.vocab_state` asks for."""
    return partial(reconstruction_loss, lean=model.cfg.vocab_state == "lean")


def frame_metrics(pred: torch.Tensor, ctx: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluation of predicted frames (B, S, F): MSE per predicted frame, and the copy-last-frame baseline, which
    predicts frame i + 1 as the context's frame i."""
    pred, ctx, target = (at_least_fp32(t).detach() for t in (pred, ctx, target))
    return {"mse": F.mse_loss(pred, target), "copy_last_mse": F.mse_loss(ctx, target)}


class EBTObjective(nn.Module):
    def __init__(self, model: EBT, mcmc: MCMC):
        super().__init__()
        self.model = model
        self.mcmc = mcmc
        self.loss_fn = loss_for(model)
        self.state_shard = (0, 1)  # (index, count): tensor parallelism keeps only this slice of the vocabulary state

    def state_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like this rank's state, drawn at full width and sliced, so that a
        vocabulary-split state starts and moves exactly like the unsplit one."""
        index, count = self.state_shard
        if count == 1:
            return torch.randn_like(like)
        full = torch.randn(*like.shape[:-1], like.shape[-1] * count, device=like.device, dtype=like.dtype)
        return full.chunk(count, dim=-1)[index]

    def init_state(self, ctx: torch.Tensor) -> torch.Tensor:
        """Noise to start from: V logits per position for text, an F-dim embedding for frames. Always fp32."""
        cfg = self.model.cfg
        state_dim = cfg.vocab_size if cfg.modality == "text" else cfg.frame_dim
        local = torch.empty(ctx.shape[0], ctx.shape[1], state_dim // self.state_shard[1], device=ctx.device)
        return self.mcmc.cfg.init_scale * self.state_noise(local)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ctx, target = split_batch(batch)
        context = self.model.encode_context(ctx)  # once per batch, shared by every MCMC step
        result, loss = self.mcmc.train_refine(
            lambda pred, step: self.model.energy(context, pred, step),
            self.init_state(ctx),
            target,
            self.loss_fn,
            noise_fn=self.state_noise,
        )
        metrics = {"loss": loss.detach(), "alpha": self.mcmc.step_size().detach()}
        # Only the steps every batch runs: with a random step count, ranks must still report the same keys.
        always = result.losses[: self.mcmc.cfg.num_steps]
        metrics.update({f"loss_step{k}": step_loss.detach() for k, step_loss in enumerate(always)})
        metrics["energy_first"], metrics["energy_last"] = result.energies[0], result.energies[-1]
        return StepOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def predict(
        self, ctx: torch.Tensor, target: torch.Tensor | None = None, num_steps: int | None = None
    ) -> RefineResult:
        """Deterministic refinement (no noise, no jitter) from fresh start noise; no graph is kept. With a target,
        the result holds the loss after every step."""
        context = self.model.encode_context(ctx)
        return refine(
            lambda pred, step: self.model.energy(context, pred, step),
            self.init_state(ctx),
            self.mcmc.step_size(),
            num_steps or self.mcmc.cfg.num_steps,
            target=target,
            loss_fn=None if target is None else self.loss_fn,
            create_graph=False,
        )

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor], num_steps: int | None = None) -> dict[str, torch.Tensor]:
        """The loss after the last step of `predict`."""
        ctx, target = split_batch(batch)
        result = self.predict(ctx, target, num_steps)
        metrics = {"loss": result.losses[-1].detach(), "energy_last": result.energies[-1]}
        if target.is_floating_point():
            metrics.update(frame_metrics(result.pred, ctx, target))
        return metrics


class ARObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = loss_for(model)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ctx, target = split_batch(batch)
        loss = self.loss_fn(self.model(ctx), target)
        return StepOutput(loss=loss, metrics={"loss": loss.detach()})

    @torch.no_grad()
    def predict(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.model(ctx)

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor], num_steps: int | None = None) -> dict[str, torch.Tensor]:
        ctx, target = split_batch(batch)
        pred = self.predict(ctx)
        metrics = {"loss": self.loss_fn(pred, target)}
        if target.is_floating_point():
            metrics.update(frame_metrics(pred, ctx, target))
        return metrics


def build_objective(model: nn.Module, mcmc: MCMC) -> nn.Module:
    return EBTObjective(model, mcmc) if isinstance(model, EBT) else ARObjective(model)
