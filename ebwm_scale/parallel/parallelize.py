"""Applies parallelism and memory techniques to a plain model from the outside, in a fixed order.

1. Activation checkpointing: transformer blocks recompute their activations in the backward. Non-reentrant
   checkpointing (use_reentrant=False) is the variant that supports double backward (DESIGN §4); the reentrant one
   does not. It covers every block forward: the AR trunk, the masked EBT, the EBT context stream and the prediction
   stream that runs once per MCMC step.
2. Data parallelism / ZeRO: by the training engine (parallel/engine.py), after this.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ebwm_scale.parallel.dist import ParallelConfig


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap the model's transformer blocks in place; state_dict keys stay the same (the wrapper strips its prefix)."""
    layers = model.transformer.layers
    every = {"full": 1, "selective": 2}[mode]
    for index, block in enumerate(layers):
        if index % every == 0:
            layers[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def parallelize(objective: nn.Module, cfg: ParallelConfig) -> nn.Module:
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(objective.model, cfg.activation_checkpointing)
    return objective
