"""Our own data parallelism: gradients reduced after the outer backward, replicated or sharded.

- DataParallelEngine (`parallel.data_parallel: ddp`): every rank holds everything; gradients are averaged after the
  outer backward, outside the double-backward graph, so the EBT's second-order gradients are exact. With a
  ShardedOptimizer (`parallel.shard_optimizer`) it is ZeRO-1, which composes with tensor and pipeline parallelism
  (parallel/zero.py).
- FSDPEngine (`parallel.data_parallel: fsdp`): parameters, gradients and optimizer state sharded (ZeRO-3's memory
  model) with torch FSDP2, per transformer block; composes with tensor parallelism. FSDP2 frees gathered weights
  after each backward by default, but the EBT's outer backward runs through the energy gradient's graph, which still
  needs them ("setStorage: ... out of bounds for storage of size 0"): reshard-after-backward is off, and the engine
  reshards explicitly once the outer backward is done, before the optimizer step. Cost: from the first backward of a
  step to its end, the blocks that backward touched stay gathered, i.e. up to all parameters for the step (grads and
  optimizer state stay sharded); in the forward, blocks are gathered one at a time.
- PipelineEngine (`parallel.pipeline_parallel`): a DataParallelEngine over one pipeline stage whose
  forward_backward is the stage's schedule (parallel/pipeline.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ebwm_scale.core.objective import ARObjective, EBTObjective
from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.checkpoint_form import checkpoint_state, load_checkpoint_state
from ebwm_scale.parallel.dist import DistInfo, all_reduce_gradients
from ebwm_scale.parallel.engines.base import Batch, Engine
from ebwm_scale.parallel.pipeline import PipelineSchedule
from ebwm_scale.parallel.plans import plan_for
from ebwm_scale.parallel.tensor import (
    all_reduce_sequence_parallel_gradients,
    gather_full_state,
    shard_full_state,
    sharded_weights,
)
from ebwm_scale.parallel.zero import ShardedOptimizer


class DataParallelEngine(Engine):
    can_skip_steps = True
    resizable = True  # its checkpoints load onto any number of ranks
    checkpoint_safe_globals: list = []

    def __init__(
        self,
        objective: EBTObjective | ARObjective,
        optimizer: torch.optim.Optimizer,
        dist: DistInfo,
        grad_clip: float,
        grad_accum_steps: int,
    ):
        self.module = objective
        self.optimizer = optimizer
        self.dist = dist
        self.grad_clip = grad_clip
        self.grad_accum_steps = grad_accum_steps
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.sharded = isinstance(optimizer, ShardedOptimizer)
        self.grads_split_over_dp = self.sharded  # each data-parallel rank holds a disjoint share of the gradients

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def optimizer_step(self, skip: bool) -> float:
        """Average, clip and apply the accumulated gradients (unless skip, or the gradient is not finite); returns
        the global gradient norm before clipping (nan when skipped without one)."""
        all_reduce_sequence_parallel_gradients(self.module)  # norm gains that saw only this rank's rows
        if self.sharded:
            self.optimizer.reduce_gradients()
        else:
            all_reduce_gradients(self.params, self.dist.dp_size, self.dist.dp_group)
        grad_norm = self._clip_gradients()
        if not skip and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _clip_gradients(self) -> float:
        """Clip by the global norm, computed once: squares summed over the data-parallel ranks when each holds a
        disjoint share of the gradients (ZeRO-1, FSDP), over the tensor-parallel group for sharded weights
        (replicated ones counted once), over the pipeline stages; every rank then scales by the same factor."""
        if self.dist.tp_size == self.dist.pp_size == 1 and not self.grads_split_over_dp:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")))
        sharded = {id(layer.weight) for _, layer in sharded_weights(self.module)}
        grads = [(p.grad, id(p) in sharded) for p in self.params if p.grad is not None]
        squares = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # [tp-sharded, tp-replicated]
        for grad, tp_sharded in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            squares[0 if tp_sharded else 1] += local.double().pow(2).sum()
        if self.grads_split_over_dp and self.dist.dp_size > 1:
            collectives.all_reduce(squares, group=self.dist.dp_group)
        if self.dist.tp_size > 1:
            collectives.all_reduce(squares[0], group=self.dist.tp_group)
        total = squares.sum()
        if self.dist.pp_size > 1:  # each stage holds different parameters
            collectives.all_reduce(total, group=self.dist.pp_group)
        grad_norm = float(total.sqrt())
        if self.grad_clip and grad_norm > 0:
            scale = min(1.0, self.grad_clip / (grad_norm + 1e-6))
            for grad, _ in grads:
                grad.mul_(scale)
        return grad_norm

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.module.evaluate(batch)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (tensor-parallel shards gathered): checkpoints and exports are topology-free."""
        state = self.module.state_dict()
        return gather_full_state(self.module, state) if self.dist.tp_size > 1 else state

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(shard_full_state(self.module, state) if self.dist.tp_size > 1 else state)

    def checkpoint_state(self) -> dict[str, Any]:
        """Model and optimizer state for torch.distributed.checkpoint, in the form every engine shares."""
        mesh = self.dist.mesh if self.dist.tp_size > 1 else None
        if self.sharded:
            return checkpoint_state(self.module, None, mesh, self.optimizer.moments(self.module))
        return checkpoint_state(self.module, self.optimizer, mesh)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.sharded:  # DCP filled this rank's moments in place (views of the live state)
            load_checkpoint_state(self.module, None, state)
        else:
            load_checkpoint_state(self.module, self.optimizer, state)

    def rank_state(self) -> None:
        return None  # everything is in the DCP state

    def load_rank_state(self, state: None) -> None:
        pass


class FSDPEngine(DataParallelEngine):
    """Sharded parameters (FSDP2), see the module docstring. Each rank writes its own shards to a checkpoint."""

    def __init__(
        self,
        objective: EBTObjective | ARObjective,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        dist: DistInfo,
        grad_clip: float,
        grad_accum_steps: int,
    ):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # under tensor parallelism FSDP shards each rank's tensor-parallel piece over its data-parallel group
        mesh = dist.mesh["dp"] if dist.tp_size > 1 else init_device_mesh(dist.device.type, (dist.world_size,))
        # q/k/v are stacked along the rows: shard them along D_in, so that each rank's shard is one box of the
        # (3, D, D_in) checkpoint form (parallel/checkpoint_form.py); a tensor-parallel weight along the dimension
        # tensor parallelism leaves whole, so that the two together cut one box of the unsharded weight.
        plan = plan_for(objective.model)
        stacked = {
            id(objective.model.get_submodule(path).weight)
            for path, layer in plan.tp_layers(objective.model).items()
            if layer.stacked > 1
        }
        tp_dims = {id(layer.weight): layer.shard_dim for _, layer in sharded_weights(objective)}

        def placement(param: nn.Parameter) -> Shard | None:
            if id(param) in stacked:
                return Shard(1)
            return Shard(1 - tp_dims[id(param)]) if id(param) in tp_dims else None

        self.units: list[Any] = []  # FSDP modules: fully_shard gives them its methods at run time
        for block in plan.blocks_of(objective.model):
            fully_shard(block, mesh=mesh, shard_placement_fn=placement)
            self.units.append(block)
        # the rest: embeddings, state mapping, energy/output head, alpha
        fully_shard(objective, mesh=mesh, shard_placement_fn=placement)
        self.units.append(objective)
        for unit in self.units:
            unit.set_reshard_after_backward(False)  # the outer backward still needs the gathered weights
        optimizer = make_optimizer(objective)  # over the sharded parameters
        super().__init__(objective, optimizer, dist, grad_clip, grad_accum_steps)
        self.grads_split_over_dp = True

    def optimizer_step(self, skip: bool) -> float:
        for unit in self.units:
            unit.reshard()
        grad_norm = self._clip_gradients()  # FSDP has reduce-scattered the gradients in the backward
        if not skip and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for unit in self.units:  # evaluate() is not forward(), so no FSDP hook gathers the weights for it
            unit.unshard()
        try:
            return self.module.evaluate(batch)
        finally:
            for unit in self.units:
                unit.reshard()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.dist.tp_size == 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return cast(dict[str, torch.Tensor], get_model_state_dict(self.module, options=options))
        # cpu_offload would leave all but rank 0 without the pieces the tensor-parallel gather needs
        whole = StateDictOptions(full_state_dict=True)
        pieces = cast(dict[str, torch.Tensor], get_model_state_dict(self.module, options=whole))
        return {key: value.cpu() for key, value in gather_full_state(self.module, pieces).items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.dist.tp_size > 1:
            state = shard_full_state(self.module, state)
        current = self.module.state_dict()
        self.module.load_state_dict({key: _local_shard(state[key], value) for key, value in current.items()})


def _local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, laid out like `like` (a DTensor shard, or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


class PipelineEngine(DataParallelEngine):
    """`parallel.pipeline_parallel`: this rank holds one stage; its schedule runs forward and backward together,
    exchanging activations and gradients with the neighbouring stages. Gradients are then reduced over the
    data-parallel replicas of the stage and clipped by the norm over all stages."""

    def __init__(
        self,
        objective: EBTObjective | ARObjective,
        optimizer: torch.optim.Optimizer,
        dist: DistInfo,
        grad_clip: float,
        grad_accum_steps: int,
        schedule: PipelineSchedule,
    ):
        super().__init__(objective, optimizer, dist, grad_clip, grad_accum_steps)
        self.schedule = schedule

    def forward_backward(self, batch: Batch, autocast: AbstractContextManager) -> dict[str, torch.Tensor]:
        return self.schedule.forward_backward(batch, 1 / self.grad_accum_steps, autocast)

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.schedule.evaluate(batch)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        stage_state = {key: value.cpu() for key, value in super().model_state_dict().items()}
        stages: list[Any] = [None] * self.dist.pp_size
        collectives.all_gather_object(stages, stage_state, group=self.dist.pp_group)
        return {key: value for stage in stages for key, value in stage.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_model_state_dict({key: state[key] for key in self.module.state_dict()})
