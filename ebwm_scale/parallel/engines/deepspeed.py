"""DeepSpeed's ZeRO as a training engine (`parallel.data_parallel: zero`).

DeepSpeedEngine: ZeRO stage 0/1/2. DeepSpeed's backward hooks fire on the outer backward only (the energy gradient
is taken with autograd.grad, which touches no parameter .grad), which is why stages 0-2 train the EBT correctly.
DeepSpeedZero3Engine: stage 3, keeping each gathered parameter pinned until the outer backward is done: DeepSpeed
would free it after its module's forward while the energy gradient's graph still holds it ("mat2 must be a matrix",
docs/design.md §3).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

import torch

from ebwm_scale.core.objective import ARObjective, EBTObjective
from ebwm_scale.parallel.checkpoint_form import checkpoint_state, load_checkpoint_state
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.engines.base import Batch, Engine
from ebwm_scale.parallel.plans import plan_for

STEPS_PER_PRINT_NEVER = 2**62


def deepspeed_config(
    parallel: ParallelConfig, *, micro_batch_size: int, grad_accum_steps: int, grad_clip: float, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config implied by the recipe, with parallel.deepspeed_config's extra keys merged in; a key the
    file sets differently from the recipe is an error naming both."""
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage, "elastic_checkpoint": False},
        # train.precision=bf16 means what it means under every engine: fp32 weights (alpha above all: 500 in bf16
        # moves in steps of 2) and fp32 MCMC state, matmuls in bf16 under the trainer's autocast. DeepSpeed's own
        # bf16 mode would cast the whole module, so it stays off; gradients are then reduced in fp32, as Megatron
        # does by default for bf16.
        "bf16": {"enabled": False},
        "steps_per_print": STEPS_PER_PRINT_NEVER,
    }
    if not parallel.deepspeed_config:
        return generated
    with open(parallel.deepspeed_config) as f:
        user = json.load(f)

    def merge(ours: dict, theirs: dict, prefix: str) -> dict:
        merged = dict(ours)
        for key, value in theirs.items():
            if isinstance(value, dict) and isinstance(ours.get(key), dict):
                merged[key] = merge(ours[key], value, f"{prefix}{key}.")
            elif key in ours and ours[key] != value and key != "steps_per_print":
                raise ValueError(
                    f"{parallel.deepspeed_config} sets {prefix}{key}={value!r} but the recipe implies "
                    f"{ours[key]!r}; change the recipe (data.micro_batch_size, train.grad_accum_steps, "
                    "optim.grad_clip, parallel.zero_stage) instead; bf16 is train.precision=bf16 (autocast, fp32 "
                    "weights), never DeepSpeed's bf16 mode"
                )
            else:
                merged[key] = value
        return merged

    return merge(generated, user, "")


def _deepspeed_safe_globals() -> list:
    """The plain data classes a ZeRO optimizer state holds, allowed through torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine(Engine):
    def __init__(self, objective: EBTObjective | ARObjective, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
        import deepspeed

        self.stage = config["zero_optimization"]["stage"]
        self.resizable = False  # a ZeRO partition belongs to its data-parallel rank count
        # Gradients are already reduced into the optimizer's partitions when a bad loss shows: no clean skip.
        self.can_skip_steps = False
        self.checkpoint_safe_globals = _deepspeed_safe_globals()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=objective, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.module = self.engine
        self.grad_accum_steps = config["gradient_accumulation_steps"]
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self._micro += 1
        if self._micro < self.grad_accum_steps:
            self.engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary

    def optimizer_step(self, skip: bool) -> float:
        assert not skip, "the trainer stops instead of skipping when can_skip_steps is False"
        self._micro = 0
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0)

    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.engine.module.evaluate(batch)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.module.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.engine.module.load_state_dict(state)
        if self.stage > 0:  # ZeRO steps fp32 copies of its partitions: without this, step 1 reverts the weights
            self.optimizer.refresh_fp32_params()

    def checkpoint_state(self) -> dict[str, Any]:
        return checkpoint_state(self.engine.module)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        load_checkpoint_state(self.engine.module, None, state)

    def rank_state(self) -> dict[str, Any]:
        """The optimizer, as DeepSpeed partitions it: saved per rank, next to the RNG states."""
        return self.optimizer.state_dict()

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if self.stage == 0:
            self.optimizer.load_state_dict(state)
        else:
            # ZeRO reads entry [dp rank] of a per-rank list; with a rigid (non-elastic) layout and the world size
            # unchanged (the trainer enforces it) this rank's own partition is all it needs.
            world_size = self.engine.dp_world_size
            self.optimizer.load_state_dict([state] * world_size, load_from_fp32_weights=True)


class DeepSpeedZero3Engine(DeepSpeedEngine):
    """DeepSpeed ZeRO-3 for the EBT. DeepSpeed gathers a module's parameters before its forward and frees them after
    it; its stage-3 linear keeps the weight *parameter* in the energy gradient's graph, so the outer backward finds
    it freed ("mat2 must be a matrix", docs/design.md §3). Here every gathered parameter is pinned for the step: a
    forward pre-hook, run after DeepSpeed's own, marks it in use (DeepSpeed never releases a parameter with an active
    sub-module), and after the outer backward the pins go and the parameters are partitioned again, before the
    optimizer step. Parameters that are read without their module's forward (alpha, the text state's V -> D mapping,
    step embeddings: everything outside the transformer blocks) are gathered and pinned when the step starts. Memory
    is then FSDPEngine's: blocks gathered one at a time in the first forward, all of them until the outer backward
    ends; gradients and optimizer state stay partitioned."""

    PIN = -1  # a sub-module id no module has

    def __init__(self, objective: EBTObjective | ARObjective, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
        super().__init__(objective, optimizer, config)
        self.params: list[Any] = list(objective.parameters())  # DeepSpeed's parameters
        in_blocks = {id(p) for p in plan_for(objective.model).blocks_of(objective.model).parameters()}
        self.outside_blocks = [p for p in self.params if id(p) not in in_blocks]
        self.pinned: list[Any] = []  # DeepSpeed's parameters, with its ds_* attributes
        for module in objective.modules():  # registered after DeepSpeed's gathering hooks, so they run after them
            if next(module.parameters(recurse=False), None) is not None:
                module.register_forward_pre_hook(lambda m, args: self._pin(m.parameters(recurse=False)))

    def _pin(self, params) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for param in params:
            if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                param.all_gather()
            if self.PIN not in param.ds_active_sub_modules:
                param.ds_active_sub_modules.add(self.PIN)
                self.pinned.append(param)

    def _release(self, partition: bool = True) -> None:
        for param in self.pinned:
            param.ds_active_sub_modules.discard(self.PIN)
        idle = [p for p in self.pinned if not p.ds_active_sub_modules]
        if idle and partition:
            idle[0].partition(param_list=idle)
        self.pinned.clear()

    def forward_backward(self, batch: Batch, autocast: AbstractContextManager) -> dict[str, torch.Tensor]:
        self._pin(self.outside_blocks)
        try:
            return super().forward_backward(batch, autocast)
        finally:
            self._release()

    def _gathered(self, modifier_rank: int | None):
        """Every parameter whole on every rank inside the context; with modifier_rank, that rank's values are
        partitioned again on exit (every rank loads the same values here, so rank 0's are everyone's)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=modifier_rank)

    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self._gathered(None):  # evaluate() is not forward(): no hook gathers for it
            try:
                return self.engine.module.evaluate(batch)
            finally:
                self._release(partition=False)  # leaving the context partitions them

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered(None):
            return {key: value.detach().cpu().clone() for key, value in self.engine.module.state_dict().items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with self._gathered(0):
            self.engine.module.load_state_dict(state)
        self.optimizer.refresh_fp32_params()

    def checkpoint_state(self) -> dict[str, Any]:
        """The whole weights (copies: DCP writes them after the gathered context has freed the parameters); the
        optimizer's partitions, fp32 weights included, are the rank files'."""
        with self._gathered(None):
            state = checkpoint_state(self.engine.module)
            return {"model": {key: value.clone() for key, value in state["model"].items()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        with self._gathered(0):
            load_checkpoint_state(self.engine.module, None, state)
        self.optimizer.refresh_fp32_params()
