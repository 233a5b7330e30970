"""The engine contract: every call the trainer makes to reduce gradients, step the optimizer and save or load state.

The trainer owns the loop and the learning-rate schedule; an engine owns how a micro-batch's gradients are made
(forward under autocast, then the backward through the MCMC chain), how they are reduced over the ranks and applied,
and what model and optimizer state looks like in a checkpoint. Nothing else passes between the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def set_lr(optimizer: Any, lr: Callable[[float], float]) -> None:
    """Each parameter group runs at lr(its `lr_multiplier`) (alpha's group has its own, train/optim.py): a function,
    not lr * multiplier, because a schedule may decay every group to one shared floor (optim.floor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr(group["lr_multiplier"])


class Engine(ABC):
    """Subclasses: DataParallelEngine, FSDPEngine, PipelineEngine (engines/data_parallel.py); DeepSpeedEngine and
    DeepSpeedZero3Engine (engines/deepspeed.py)."""

    # What runs a micro-batch's forward and evaluates: the objective, or DeepSpeed's engine wrapping it.
    module: Any
    # torch's AdamW, our ShardedOptimizer (ZeRO-1) or DeepSpeed's; each param group carries `lr_multiplier`.
    optimizer: Any
    can_skip_steps: bool  # a step with a non-finite loss or gradient can be dropped without touching the weights
    resizable: bool  # checkpoints load onto another number of ranks
    checkpoint_safe_globals: list  # classes the per-rank state needs through torch.load(weights_only=True)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """The outer backward of one micro-batch's loss, scaled for gradient accumulation."""

    def forward_backward(self, batch: Batch, autocast: AbstractContextManager) -> dict[str, torch.Tensor]:
        """One micro-batch: the objective's forward under autocast, then its backward outside it; the metrics."""
        with autocast:
            out = self.module(batch)
        self.backward(out.loss)
        return out.metrics

    @abstractmethod
    def optimizer_step(self, skip: bool) -> float:
        """Reduce, clip and apply the accumulated gradients (none applied when skip, or when the gradient is not
        finite); the global gradient norm before clipping."""

    def set_lr(self, lr: Callable[[float], float]) -> None:
        """The schedule's learning rate for the next step, as a function of a group's lr_multiplier."""
        set_lr(self.optimizer, lr)

    @abstractmethod
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The objective's evaluation metrics on one batch, no gradient."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole, unsharded weights on every rank, keyed like the plain objective (exports, tests)."""

    @abstractmethod
    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load whole weights (a run started from an export), sharding them as this engine holds them."""

    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """Model and optimizer state in the form torch.distributed.checkpoint writes (parallel/checkpoint_form.py);
        its tensors are views of the live state, so a DCP load into it fills the engine in place."""

    @abstractmethod
    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Finish loading a checkpoint_state() that DCP has filled."""

    @abstractmethod
    def rank_state(self) -> Any:
        """What only this rank holds and DCP does not save (saved per rank, beside the RNG states), or None."""

    @abstractmethod
    def load_rank_state(self, state: Any) -> None:
        """Restore rank_state()'s value from a checkpoint saved under the same layout."""
