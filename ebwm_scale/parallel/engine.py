"""Training engines: how gradients are reduced and the optimizer is stepped, replicated or sharded.

The trainer talks to one interface: `forward_backward(batch, autocast)` once per micro-batch (the objective's
forward, then `backward(loss)`), `optimizer_step(skip)` once per optimizer step, `set_lr`, `evaluate`, and model and
optimizer state for checkpoints.

- DataParallelEngine (`parallel.data_parallel: ddp`): every rank holds everything; gradients are averaged after the
  outer backward, outside the double-backward graph, so the EBT's second-order gradients are exact.
- FSDPEngine (`parallel.data_parallel: fsdp`): parameters, gradients and optimizer state sharded (ZeRO-3's memory
  model) with torch FSDP2, per transformer block. FSDP2 frees gathered weights after each backward by default, but
  the EBT's outer backward runs through the energy gradient's graph, which still needs them ("setStorage: ... out of
  bounds for storage of size 0"): reshard-after-backward is off, and the engine reshards explicitly once the outer
  backward is done, before the optimizer step. Cost: from the first backward of a step to its end, the blocks that
  backward touched stay gathered, i.e. up to all parameters for the step (grads and optimizer state stay sharded);
  in the forward, blocks are gathered one at a time.
- DeepSpeedEngine (`parallel.data_parallel: zero`): DeepSpeed ZeRO stage 0/1/2. DeepSpeed's backward hooks fire on
  the outer backward only (the energy gradient is taken with autograd.grad, which touches no parameter .grad), which
  is why stages 0-2 train the EBT correctly. Stage 3 (DeepSpeedZero3Engine) keeps each gathered parameter pinned
  until the outer backward is done: DeepSpeed would free it after its module's forward while the energy gradient's
  graph still holds it ("mat2 must be a matrix", docs/design.md §3).
- DataParallelEngine with a ShardedOptimizer (`parallel.shard_optimizer`): ZeRO-1 of our own data parallelism, which
  composes with tensor and pipeline parallelism (parallel/zero.py); FSDPEngine composes with tensor parallelism.
- PipelineEngine (`parallel.pipeline_parallel`): a DataParallelEngine over one pipeline stage whose
  forward_backward is the stage's schedule (parallel/pipeline.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ebwm_scale.models.blocks import Attention
from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.checkpoint_form import checkpoint_state, load_checkpoint_state
from ebwm_scale.parallel.dist import DistInfo, all_reduce_gradients
from ebwm_scale.parallel.pipeline import pipeline_schedule
from ebwm_scale.parallel.tensor import (
    all_reduce_sequence_parallel_gradients,
    gather_full_state,
    shard_full_state,
    sharded_weights,
)
from ebwm_scale.parallel.zero import ShardedOptimizer
from ebwm_scale.train.optim import set_lr

STEPS_PER_PRINT_NEVER = 2**62


class Engine:
    """What every engine shares: one micro-batch's forward under autocast, then its backward outside it."""

    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def forward_backward(self, batch: dict[str, torch.Tensor], autocast) -> dict[str, torch.Tensor]:
        with autocast:
            out = self.module(batch)
        self.backward(out.loss)
        return out.metrics


class DataParallelEngine(Engine):
    can_skip_steps = True
    resizable = True  # its checkpoints load onto any number of ranks
    checkpoint_safe_globals: list = []

    def __init__(
        self,
        objective: nn.Module,
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

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

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

    def rank_state(self) -> Any:
        """What only this rank holds and DCP does not save (DeepSpeed's optimizer partition): nothing here."""
        return None

    def load_rank_state(self, state: Any) -> None:
        pass


class FSDPEngine(DataParallelEngine):
    """Sharded parameters (FSDP2), see the module docstring. Each rank writes its own shards to a checkpoint."""

    def __init__(self, objective: nn.Module, cfg, dist: DistInfo):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # under tensor parallelism FSDP shards each rank's tensor-parallel piece over its data-parallel group
        mesh = dist.mesh["dp"] if dist.tp_size > 1 else init_device_mesh(dist.device.type, (dist.world_size,))
        # q/k/v are stacked along the rows: shard them along D_in, so that each rank's shard is one box of the
        # (3, D, D_in) checkpoint form (parallel/state.py); a tensor-parallel weight along the dimension tensor
        # parallelism leaves whole, so that the two together cut one box of the unsharded weight.
        stacked = {id(layer.wqkv.weight) for layer in objective.modules() if isinstance(layer, Attention)}
        tp_dims = {id(layer.weight): layer.shard_dim for _, layer in sharded_weights(objective)}

        def placement(param: nn.Parameter) -> Shard | None:
            if id(param) in stacked:
                return Shard(1)
            return Shard(1 - tp_dims[id(param)]) if id(param) in tp_dims else None

        self.units = []
        for block in objective.model.transformer.layers:
            fully_shard(block, mesh=mesh, shard_placement_fn=placement)
            self.units.append(block)
        # the rest: embeddings, state mapping, energy/output head, alpha
        fully_shard(objective, mesh=mesh, shard_placement_fn=placement)
        self.units.append(objective)
        for unit in self.units:
            unit.set_reshard_after_backward(False)  # the outer backward still needs the gathered weights
        optimizer = cfg.optim.build(objective, cfg.mcmc.alpha_lr_multiplier)  # over the sharded parameters
        super().__init__(objective, optimizer, dist, cfg.optim.grad_clip, cfg.train.grad_accum_steps)
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
            return get_model_state_dict(self.module, options=options)
        # cpu_offload would leave all but rank 0 without the pieces the tensor-parallel gather needs
        pieces = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
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


def deepspeed_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config implied by the recipe, with parallel.deepspeed_config's extra keys merged in; a key the
    file sets differently from the recipe is an error naming both."""
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "elastic_checkpoint": False},
        # train.precision=bf16 means what it means under every engine: fp32 weights (alpha above all: 500 in bf16
        # moves in steps of 2) and fp32 MCMC state, matmuls in bf16 under the trainer's autocast. DeepSpeed's own
        # bf16 mode would cast the whole module, so it stays off; gradients are then reduced in fp32, as Megatron
        # does by default for bf16.
        "bf16": {"enabled": False},
        "steps_per_print": STEPS_PER_PRINT_NEVER,
    }
    if not cfg.parallel.deepspeed_config:
        return generated
    with open(cfg.parallel.deepspeed_config) as f:
        user = json.load(f)

    def merge(ours: dict, theirs: dict, prefix: str) -> dict:
        merged = dict(ours)
        for key, value in theirs.items():
            if isinstance(value, dict) and isinstance(ours.get(key), dict):
                merged[key] = merge(ours[key], value, f"{prefix}{key}.")
            elif key in ours and ours[key] != value and key != "steps_per_print":
                raise ValueError(
                    f"{cfg.parallel.deepspeed_config} sets {prefix}{key}={value!r} but the recipe implies "
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
    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
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

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
        super().__init__(objective, optimizer, config)
        self.params = list(objective.parameters())
        in_blocks = {id(p) for p in objective.model.transformer.layers.parameters()}
        self.outside_blocks = [p for p in self.params if id(p) not in in_blocks]
        self.pinned: list[nn.Parameter] = []
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

    def forward_backward(self, batch: dict[str, torch.Tensor], autocast) -> dict[str, torch.Tensor]:
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

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


class PipelineEngine(DataParallelEngine):
    """`parallel.pipeline_parallel`: this rank holds one stage; its schedule runs forward and backward together,
    exchanging activations and gradients with the neighbouring stages. Gradients are then reduced over the
    data-parallel replicas of the stage and clipped by the norm over all stages."""

    def __init__(self, objective, optimizer, dist: DistInfo, grad_clip: float, grad_accum_steps: int, schedule):
        super().__init__(objective, optimizer, dist, grad_clip, grad_accum_steps)
        self.schedule = schedule

    def forward_backward(self, batch: dict[str, torch.Tensor], autocast) -> dict[str, torch.Tensor]:
        return self.schedule.forward_backward(batch, 1 / self.grad_accum_steps, autocast)

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.schedule.evaluate(batch)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        stage_state = {key: value.cpu() for key, value in super().model_state_dict().items()}
        stages = [None] * self.dist.pp_size
        collectives.all_gather_object(stages, stage_state, group=self.dist.pp_group)
        return {key: value for stage in stages for key, value in stage.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_model_state_dict({key: state[key] for key in self.module.state_dict()})


def build_engine(cfg, objective: nn.Module, dist: DistInfo):
    if cfg.parallel.data_parallel == "fsdp":
        return FSDPEngine(objective, cfg, dist)
    optimizer = cfg.optim.build(objective, cfg.mcmc.alpha_lr_multiplier)
    if cfg.parallel.data_parallel == "zero":
        zero = DeepSpeedZero3Engine if cfg.parallel.zero_stage == 3 else DeepSpeedEngine
        return zero(objective, optimizer, deepspeed_config(cfg, dist.world_size))
    if cfg.parallel.shard_optimizer and dist.dp_size > 1:
        optimizer = ShardedOptimizer(optimizer, dist.dp_group)
    clip, accum = cfg.optim.grad_clip, cfg.train.grad_accum_steps
    if dist.pp_size > 1:
        schedule = pipeline_schedule(objective, dist, cfg.parallel.pipeline_microbatches, cfg.mcmc)
        return PipelineEngine(objective, optimizer, dist, clip, accum, schedule)
    return DataParallelEngine(objective, optimizer, dist, clip, accum)
