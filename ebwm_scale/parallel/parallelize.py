"""Applies parallelism and memory techniques to a plain model from the outside, in a fixed order.

What each step acts on comes from the model family's plan (parallel/plans.py), never from the model's attributes.

0. Tensor parallelism (parallel.tensor_parallel): layers split Megatron-style over the tensor-parallel group. A text
   EBT's objective is built with `vocab_split`, so its MCMC state is split over the vocabulary the same way. With
   parallel.sequence_parallel the blocks' norms and residual stream keep only this rank's rows of the sequence.
1. Pipeline parallelism (parallel.pipeline_parallel): each rank keeps only its stage's blocks and ends; the schedule
   that runs them is the training engine's (parallel/pipeline.py).
2. Activation checkpointing: transformer blocks recompute their activations in the backward. Non-reentrant
   checkpointing (use_reentrant=False) is the variant that supports double backward (docs/design.md §3); the
   reentrant one does not. It covers every block forward: the AR trunk, the masked EBT, the EBT context stream and
   the prediction stream that runs once per MCMC step.
   Or prediction-stream recompute (parallel.prediction_recompute, parallel/recompute.py): an EBT's prediction blocks
   also recompute what the energy gradient's graph would keep for the outer backward.
3. Sequence-parallel boundaries: the first block enters the region, the last one leaves it; after checkpointing, so
   that the first block's checkpoint keeps only this rank's rows.
4. torch.compile (parallel.compile): only what no second-order gradient passes through (apply_compile).
5. Data parallelism / ZeRO: by the training engine (parallel/engines/), after this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ebwm_scale.core.objective import ARObjective, EBTObjective
from ebwm_scale.core.spaces import TokenSpace
from ebwm_scale.models.blocks import RMSNorm
from ebwm_scale.parallel.dist import DistInfo, ParallelConfig
from ebwm_scale.parallel.pipeline import VacantLayer, apply_pipeline
from ebwm_scale.parallel.plans import TPLayer, TPStyle, plan_for
from ebwm_scale.parallel.recompute import PredictionRecompute
from ebwm_scale.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelRMSNorm,
    VocabParallel,
    VocabParallelEmbedding,
    VocabParallelOutput,
    gather_from_sequence_parallel,
    scatter_to_sequence_parallel,
)


def _wrap_blocks(model: nn.Module, mode: str, wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Wrap every (full) or every second (selective) transformer block in place; state_dict keys stay the same (the
    wrappers strip their prefix)."""
    layers = plan_for(model).blocks_of(model)
    every = {"full": 1, "selective": 2}[mode]
    for index, block in enumerate(layers):
        if index % every == 0 and not isinstance(block, VacantLayer):
            layers[index] = wrap(block)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    _wrap_blocks(model, mode, lambda block: checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def apply_prediction_recompute(model: nn.Module, mode: str) -> None:
    _wrap_blocks(model, mode, PredictionRecompute)


def _tensor_parallel_layer(layer: Any, spec: TPLayer, group, sequence_parallel: bool) -> nn.Module:
    if spec.style == TPStyle.column:
        return ColumnParallelLinear(layer, group, blocks=spec.stacked, sequence_parallel=sequence_parallel)
    if spec.style == TPStyle.row:
        return RowParallelLinear(layer, group, sequence_parallel=sequence_parallel)
    if spec.style == TPStyle.vocab_embedding:
        return VocabParallelEmbedding(layer, group)
    return VocabParallelOutput(layer, group)


def apply_tensor_parallel(model: nn.Module, group, sequence_parallel: bool = False) -> None:
    """Megatron layout, in place, as the plan names it: attention heads and the SwiGLU hidden units split over
    `group` (q/k/v and gate/up column-parallel, the output projections row-parallel); token embeddings, the EBT's
    V -> D state mapping and the AR head split over the vocabulary; norms, frame projections and the energy head
    replicated. The blocks' attention infers its local head count from the split width (models/blocks.py).
    `sequence_parallel`: the blocks' norms gather the sequence and their output projections reduce-scatter it
    (parallel/tensor.py); the region's boundaries come from apply_sequence_parallel_boundaries."""
    plan = plan_for(model)
    for path, spec in plan.tp_layers(model).items():
        in_block = path not in plan.tp  # only the blocks' layers lie inside the sequence-parallel region
        layer = _tensor_parallel_layer(model.get_submodule(path), spec, group, sequence_parallel and in_block)
        model.set_submodule(path, layer)
    if sequence_parallel:
        for block in plan.blocks_of(model):
            for path in plan.sequence_parallel_norms:
                norm = cast(RMSNorm, block.get_submodule(path))
                block.set_submodule(path, SequenceParallelRMSNorm(norm, group))


def apply_sequence_parallel_boundaries(model: nn.Module, group) -> None:
    """The first block this rank holds takes its rows of the sequence, the last one gathers the whole sequence back:
    every call site (AR trunk, masked EBT, the EBT's context and prediction streams) runs all its blocks in order, and
    RoPE tables, masks and context keys/values stay whole-sequence. Hooks, so state_dict keys stay; on the
    checkpoint wrappers, if any, so that they sit outside the recomputed part."""
    held = [block for block in plan_for(model).blocks_of(model) if not isinstance(block, VacantLayer)]

    def enter(block, args, kwargs):
        if kwargs.get("past_kv") is not None:
            raise ValueError(
                "generation with cached keys/values does not run under parallel.sequence_parallel (new positions "
                "need not divide over the ranks); generate from an export on one process (ebwm-generate)"
            )
        return (scatter_to_sequence_parallel(args[0], group), *args[1:]), kwargs

    def leave(block, args, output):
        if isinstance(output, tuple):  # (h, keys/values): keys/values are made from the gathered rows, already whole
            return (gather_from_sequence_parallel(output[0], group), *output[1:])
        return gather_from_sequence_parallel(output, group)

    held[0].register_forward_pre_hook(enter, with_kwargs=True)
    held[-1].register_forward_hook(leave)


def vocab_split(dist_info: DistInfo | None) -> VocabParallel | None:
    """What a text EBT's objective is built with under tensor parallelism: each rank keeps and refines only its
    slice of the B x S x V state, and its loss is a vocabulary-parallel cross-entropy (core/spaces.py does the math)."""
    if dist_info is None or dist_info.tp_size == 1:
        return None
    return VocabParallel(dist_info.tp_group)


def apply_compile(model: nn.Module) -> None:
    """torch.compile where the plan allows it, i.e. where no gradient is taken twice (compiled graphs have no double
    backward: docs/design.md §3). Module names and state_dict keys stay."""
    plan = plan_for(model)
    if plan.compile_blocks:
        for block in plan.blocks_of(model):
            block.compile()
    for name in plan.compile_methods:
        setattr(model, name, torch.compile(getattr(model, name)))


def parallelize(
    objective: EBTObjective | ARObjective, cfg: ParallelConfig, dist_info: DistInfo | None = None
) -> EBTObjective | ARObjective:
    model = objective.model
    tp_size = 1 if dist_info is None else dist_info.tp_size
    tp_group = dist_info.tp_group if dist_info is not None and tp_size > 1 else None
    if tp_group is not None:
        # a text EBT's state is split over the vocabulary like its V -> D mapping (vocab_split)
        space = objective.space if isinstance(objective, EBTObjective) else None
        if isinstance(space, TokenSpace) and space.split.count != tp_size:
            raise ValueError("a text EBT under tensor parallelism needs build_objective(..., vocab_split(dist_info))")
        apply_tensor_parallel(model, tp_group, cfg.sequence_parallel)
    if dist_info is not None and dist_info.pp_size > 1:
        apply_pipeline(objective, dist_info.pp_rank, dist_info.pp_size)
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.prediction_recompute != "none":
        apply_prediction_recompute(model, cfg.prediction_recompute)
    if cfg.sequence_parallel and tp_group is not None:
        apply_sequence_parallel_boundaries(model, tp_group)
    if cfg.compile:
        apply_compile(model)
    return objective
