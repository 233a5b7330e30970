"""One parallel plan per model family: plain data naming what the generic parallel code acts on.

The models stay plain PyTorch and know nothing of parallelism (docs/design.md, "Layers"); each model class has one
ParallelPlan here that says, by module path, which layers tensor parallelism splits and how (Megatron's column /
row / vocabulary styles), which norms gather the sequence under sequence parallelism, which modules only the first
or the last pipeline stage keeps, and what may be compiled. parallelize.py, the pipeline cut and the engines apply
the plan; none of them guesses the model from its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import cast

from torch import nn

from ebwm_scale.models import ARFrames, ARText, EBTFrames, EBTText


class TPStyle(str, Enum):
    """How a layer is split over the tensor-parallel group (parallel/tensor.py states the math of each)."""

    column = "column"  # Y = X A with A's output columns split: ColumnParallelLinear
    row = "row"  # Y = X A with A's input rows split, partial results summed: RowParallelLinear
    vocab_embedding = "vocab_embedding"  # an embedding table split over the vocabulary: VocabParallelEmbedding
    vocab_output = "vocab_output"  # a V-wide output head split over the vocabulary: VocabParallelOutput


@dataclass(frozen=True)
class TPLayer:
    style: TPStyle
    stacked: int = 1  # matrices stacked along the output rows (q, k, v: 3); each is split on its own


COLUMN, ROW = TPLayer(TPStyle.column), TPLayer(TPStyle.row)

# Every model family's transformer block (models/blocks.py TransformerBlock), paths relative to the block.
BLOCK_TP = {
    "attention.wqkv": TPLayer(TPStyle.column, stacked=3),
    "attention.wo": ROW,
    "feed_forward.w_gate": COLUMN,
    "feed_forward.w_up": COLUMN,
    "feed_forward.w_down": ROW,
}
BLOCK_SEQUENCE_PARALLEL_NORMS = ("attention_norm", "ffn_norm")


@dataclass(frozen=True)
class ParallelPlan:
    """Paths in `blocks`-relative form (block_tp, sequence_parallel_norms), model-relative form (blocks, tp,
    compile_methods) or objective-relative form (first_stage, last_stage: the objective holds the model as `model`
    and, for an EBT, its MCMC module with alpha as `mcmc`)."""

    tp: dict[str, TPLayer]  # layers outside the blocks
    first_stage: tuple[str, ...]  # kept only by pipeline stage 0: embeddings, the state mapping, alpha
    last_stage: tuple[str, ...]  # kept only by the last stage: the final norm and the head
    # torch.compile only where no second-order gradient passes (docs/design.md §3): every block of an AR model
    # (`compile_blocks`), or a model method whose graph is differentiated once (the EBT's real-token stream).
    compile_blocks: bool = False
    compile_methods: tuple[str, ...] = ()
    blocks: str = "transformer.layers"  # the ModuleList of blocks: pipeline cut, checkpointing, FSDP units
    block_tp: dict[str, TPLayer] = field(default_factory=lambda: dict(BLOCK_TP))
    sequence_parallel_norms: tuple[str, ...] = BLOCK_SEQUENCE_PARALLEL_NORMS

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, model.get_submodule(self.blocks))

    def tp_layers(self, model: nn.Module) -> dict[str, TPLayer]:
        """Every tensor-parallel layer of `model` by its path in the model, blocks first."""
        layers = {}
        for index in range(len(self.blocks_of(model))):
            layers.update({f"{self.blocks}.{index}.{path}": layer for path, layer in self.block_tp.items()})
        return layers | self.tp


EBT_LAST_STAGE = ("model.transformer.norm", "model.energy_head")
AR_LAST_STAGE = ("model.transformer.norm", "model.output")
# The EBT's split layout differentiates the real-token stream once (in the outer backward): it may be compiled; the
# prediction stream, differentiated twice, stays eager.
EBT_COMPILED = ("context_layers",)

PLANS: dict[type[nn.Module], ParallelPlan] = {
    EBTText: ParallelPlan(
        tp={"tok_embeddings": TPLayer(TPStyle.vocab_embedding), "vocab_to_embed": ROW},
        first_stage=("model.tok_embeddings", "model.vocab_to_embed", "model.step_embeddings", "mcmc"),
        last_stage=EBT_LAST_STAGE,
        compile_methods=EBT_COMPILED,
    ),
    EBTFrames: ParallelPlan(
        tp={},
        first_stage=("model.frame_in", "model.frame_in_norm", "model.step_embeddings", "mcmc"),
        last_stage=EBT_LAST_STAGE,
        compile_methods=EBT_COMPILED,
    ),
    ARText: ParallelPlan(
        tp={"tok_embeddings": TPLayer(TPStyle.vocab_embedding), "output": TPLayer(TPStyle.vocab_output)},
        first_stage=("model.tok_embeddings",),
        last_stage=AR_LAST_STAGE,
        compile_blocks=True,
    ),
    ARFrames: ParallelPlan(
        tp={},
        first_stage=("model.frame_in", "model.frame_in_norm"),
        last_stage=AR_LAST_STAGE,
        compile_blocks=True,
    ),
}


def plan_for(model: nn.Module) -> ParallelPlan:
    """The plan of `model`'s exact class: a subclass may add modules its parent's plan does not name."""
    plan = PLANS.get(type(model))
    if plan is None:
        known = ", ".join(cls.__name__ for cls in PLANS)
        raise TypeError(f"no parallel plan for {type(model).__name__} (plans exist for {known}): add one to PLANS")
    return plan
