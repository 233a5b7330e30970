"""ZeRO-1 over a data-parallel group (`parallel.shard_optimizer`): each rank keeps the optimizer state of its share
of the parameters only, as Megatron's distributed optimizer does on top of tensor and pipeline parallelism.

torch's ZeroRedundancyOptimizer does the partitioning, the local step and the broadcast of updated parameters from
their owners. What it leaves to us is the gradient side: after the outer backward (outside the double-backward graph,
like the plain all-reduce) each owner receives the sum of its parameters' gradients (one reduce per owner, together a
reduce-scatter's traffic) and every other rank drops them, so the gradient norm is a sum over disjoint shards.
Under tensor and pipeline parallelism each (pp, tp) coordinate has its own data-parallel group and partition.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.tensor import state_key


class ShardedOptimizer:
    """An optimizer (AdamW from OptimConfig.build) whose state is split over `group`'s ranks by whole parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: Any):
        groups = [dict(g) for g in optimizer.param_groups]  # lr_multiplier and friends travel with each group
        # what the constructor takes (AdamW's defaults also hold derived keys such as decoupled_weight_decay)
        accepted = inspect.signature(type(optimizer)).parameters
        defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
        self.zero = ZeroRedundancyOptimizer(groups, type(optimizer), process_group=group, **defaults)
        self.group = group
        self.size = dist.get_world_size(group)
        self.params = [p for g in groups for p in g["params"]]
        self.owned = [p for g in self.zero.optim.param_groups for p in g["params"]]
        owned_ids = {id(p) for p in self.owned}
        owned = [i for i, p in enumerate(self.params) if id(p) in owned_ids]
        by_rank: list[list[int]] = [[] for _ in range(self.size)]
        collectives.all_gather_object(by_rank, owned, group=group)
        self.owner = {id(self.params[i]): rank for rank, indices in enumerate(by_rank) for i in indices}

    @property
    def param_groups(self) -> list[dict]:
        """The whole model's groups (the learning rate is set here; the step passes it to the local optimizer)."""
        return self.zero.param_groups

    @property
    def local(self) -> torch.optim.Optimizer:
        """The optimizer over this rank's share."""
        return self.zero.optim

    def reduce_gradients(self) -> None:
        """Average each parameter's gradient onto its owner; other ranks drop it."""
        for rank in range(self.size):
            params = [p for p in self.params if p.grad is not None and self.owner[id(p)] == rank]
            if not params:
                continue
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            collectives.reduce(flat, group_dst=rank, group=self.group)
            if rank != dist.get_rank(self.group):
                for p in params:
                    p.grad = None
                continue
            flat /= self.size
            collectives.unflatten_into([p.grad for p in params], flat)

    def step(self) -> None:
        self.zero.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.zero_grad(set_to_none=set_to_none)

    def moments(self, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """state_dict key -> this rank's optimizer state of each parameter it owns, created (zero) if the optimizer
        has not stepped yet, so that a checkpoint can be loaded into it."""
        missing = [p for p in self.owned if p not in self.local.state]
        if missing:
            self._init_state(missing)
        return {
            state_key(*name.rsplit(".", 1)): self.local.state[param]
            for name, param in module.named_parameters()
            if param in self.local.state
        }

    def _init_state(self, params: list[nn.Parameter]) -> None:
        """One local step at lr 0 in which only `params` have a (zero) gradient: their state exists, no weight moves
        and no other parameter's state changes."""
        grads = {p: p.grad for p in self.owned}
        lrs = [group["lr"] for group in self.local.param_groups]
        for p in self.owned:
            p.grad = None
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in self.local.param_groups:
            group["lr"] = 0.0
        self.local.step()
        for p, grad in grads.items():
            p.grad = grad
        for group, lr in zip(self.local.param_groups, lrs):
            group["lr"] = lr
