"""Training objectives: a model plus its loss, as one nn.Module whose forward takes a batch and returns the loss.

A batch is a dict with "tokens" (B, S+1) int64 for text or "frames" (B, S+1, F) float for frames; the first S
elements are the context and the last S the targets. Wrapping model and loss in one module (with alpha inside)
lets DeepSpeed or any other engine treat the whole thing as one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebwm_scale.core.mcmc import MCMC, MCMCConfig, RefineResult, refine
from ebwm_scale.core.replay import ReplayBuffer
from ebwm_scale.core.spaces import build_space
from ebwm_scale.core.vocab_kernels import VocabSplit, lean_cross_entropy
from ebwm_scale.models import EBT
from ebwm_scale.models.ebt import EncodedContext
from ebwm_scale.numerics import at_least_fp32


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    metrics: dict[str, torch.Tensor]  # detached scalars for logging


def batch_sequences(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's (B, S+1) tokens or (B, S+1, F) frames."""
    return batch["tokens"] if "tokens" in batch else batch["frames"]


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    seq = batch_sequences(batch)
    return seq[:, :-1], seq[:, 1:]  # context (B, S, ...), target (B, S, ...)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The AR baselines' loss: cross-entropy of logits (the lean one, which saves the logits instead of fp32
    log-probabilities) or SmoothL1 (beta 1) to the next frame."""
    if target.dtype == torch.long:
        return lean_cross_entropy(pred.flatten(0, 1), target.flatten())
    return F.smooth_l1_loss(at_least_fp32(pred), target.to(at_least_fp32(pred).dtype), beta=1.0)


FRAME_METRICS = ("mse", "copy_last_mse")  # what frame_metrics returns, besides the loss


def frame_metrics(pred: torch.Tensor, ctx: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluation of predicted frames (B, S, F): MSE per predicted frame, and the copy-last-frame baseline, which
    predicts frame i + 1 as the context's frame i."""
    pred, ctx, target = (at_least_fp32(t).detach() for t in (pred, ctx, target))
    return dict(zip(FRAME_METRICS, (F.mse_loss(pred, target), F.mse_loss(ctx, target))))


def step_loss_name(step: int) -> str:
    return f"loss_step{step}"


class EBTObjective(nn.Module):
    """An EBT, its MCMC (alpha and the loop's options) and its state space. `split`: the vocabulary slice this
    process holds when tensor parallelism splits the text state (parallel/tensor.py), else the whole vocabulary."""

    def __init__(self, model: EBT, mcmc: MCMC, split: VocabSplit | None = None):
        super().__init__()
        self.model = model
        self.mcmc = mcmc
        self.space = build_space(model, mcmc.cfg, split)
        self.replay = ReplayBuffer(mcmc.cfg.replay) if mcmc.cfg.replay.size else None

    def init_state(self, ctx: torch.Tensor) -> torch.Tensor:
        """Start noise: V numbers per position for text (this slice of them), an F-dim embedding for frames."""
        return self.space.init(ctx)

    def start_chains(
        self, sequences: torch.Tensor, parts: int = 1, replay: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The sequences the chains refine and their start states: noise for the batch's own, drawn in `parts` row
        blocks (as the pipeline's micro-batches draw it), then, with `replay` and a buffer, stored sequences appended
        (fresh rows first) with their stored final states; and the batch's own sequences, which the buffer stores
        after the step (None without replay)."""
        starts = [self.init_state(rows) for rows in sequences[:, :-1].tensor_split(parts)]
        start = starts[0] if parts == 1 else torch.cat(starts)
        if not replay or self.replay is None:
            return sequences, start, None
        extended, start = self.replay.extend(sequences, start)
        return extended, start, sequences

    def energy_fn(self, context: EncodedContext):
        return lambda candidate, step: self.model.energy(context, candidate, step)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        sequences, start, fresh = self.start_chains(batch_sequences(batch))
        ctx, target = sequences[:, :-1], sequences[:, 1:]
        context = self.model.encode_context(ctx)  # shared by every MCMC step
        cfg = self.mcmc.cfg
        handover = [start]
        del start  # refine holds the only reference: the start state (B x S x V for text) is freed after its step
        result = refine(
            self.energy_fn(context),
            self.space,
            handover.pop(),
            self.mcmc.step_size(self.mcmc.draw_step_sizes(target.shape[:2])),
            self.mcmc.sample_schedule(),
            target=target,
            truncate=cfg.truncate,
            keep_chain=cfg.keeps_chain,
            langevin_noise_std=cfg.langevin_noise_std,
            alpha_jitter=cfg.alpha_jitter,
        )
        if self.replay is not None and fresh is not None:
            assert result.pred is not None  # refine always ends with the final state
            self.replay.store(fresh, result.pred)
        loss = self.mcmc.train_loss(result.losses)
        metrics = {"loss": loss.detach(), "alpha": self.mcmc.step_size().detach()}
        # Only the steps every batch runs: with a random step count, ranks must still report the same keys.
        always = result.losses[: cfg.min_steps()]
        metrics.update({step_loss_name(k): step_loss.detach() for k, step_loss in enumerate(always)})
        metrics["energy_first"], metrics["energy_last"] = result.energies[0].mean(), result.energies[-1].mean()
        return StepOutput(loss=loss, metrics=metrics)

    @staticmethod
    def train_metric_names(mcmc: MCMCConfig) -> list[str]:
        """The keys of forward()'s metrics; the pipeline schedule computes them stage by stage under these names."""
        steps = [step_loss_name(k) for k in range(mcmc.min_steps())]
        return ["loss", "alpha", *steps, "energy_first", "energy_last"]

    @staticmethod
    def eval_metric_names(frames: bool) -> list[str]:
        """The keys of evaluate()'s metrics."""
        return ["loss", "energy_last", *(FRAME_METRICS if frames else ())]

    @torch.no_grad()
    def predict(
        self, ctx: torch.Tensor, target: torch.Tensor | None = None, num_steps: int | None = None
    ) -> RefineResult:
        """Refinement from fresh start noise, no graph kept: the evaluation schedule (every landscape its most
        steps) or `num_steps` steps, without jitter or a random step size, and without Langevin noise unless
        mcmc.langevin_at_eval. With a target, the result holds the loss after every step."""
        cfg = self.mcmc.cfg
        return refine(
            self.energy_fn(self.model.encode_context(ctx)),
            self.space,
            self.init_state(ctx),
            self.mcmc.step_size(),
            num_steps or cfg.eval_schedule(),
            target=target,
            create_graph=False,
            langevin_noise_std=cfg.langevin_std(training=False),
        )

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor], num_steps: int | None = None) -> dict[str, torch.Tensor]:
        """The loss after the last step of `predict`."""
        ctx, target = split_batch(batch)
        result = self.predict(ctx, target, num_steps)
        metrics = {"loss": result.losses[-1].detach(), "energy_last": result.energies[-1].mean()}
        if target.is_floating_point():
            assert result.pred is not None  # refine always ends with the final state
            metrics.update(frame_metrics(result.pred, ctx, target))
        return metrics


class ARObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = reconstruction_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ctx, target = split_batch(batch)
        loss = self.loss_fn(self.model(ctx), target)
        return StepOutput(loss=loss, metrics={"loss": loss.detach()})

    @staticmethod
    def train_metric_names() -> list[str]:
        return ["loss"]

    @staticmethod
    def eval_metric_names(frames: bool) -> list[str]:
        return ["loss", *(FRAME_METRICS if frames else ())]

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


def build_objective(model: nn.Module, mcmc: MCMC, split: VocabSplit | None = None) -> EBTObjective | ARObjective:
    """The EBT or AR objective of `model`; `split` is the vocabulary slice of a tensor-parallel text EBT."""
    return EBTObjective(model, mcmc, split) if isinstance(model, EBT) else ARObjective(model)
