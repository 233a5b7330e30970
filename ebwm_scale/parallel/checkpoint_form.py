"""Model and optimizer state in checkpoint form: one layout for every parallel mode, so torch.distributed.checkpoint
(DCP) writes each piece once and a checkpoint loads under any other number of ranks or parallel mode.

The form: every weight (and each of its AdamW moments) at its unsharded shape, keyed by the plain model's
state_dict names, except that q/k/v stacked in one weight are kept as (3, D, D_in), so that a tensor-parallel rank's
[q_r; k_r; v_r] is one box of it. What a rank holds is a DTensor over the ranks that split it: tensor-parallel shards
over the `tp` mesh dimension (plain local tensors otherwise, which DCP would save from one rank only and so lose the
rest), FSDP shards over FSDP's mesh (q/k/v sharded along D_in: see FSDPEngine), both at once over the
(dp, tp) grid. Replicated tensors stay plain; DCP
keeps one copy. So does it of any non-tensor value several ranks hold under one key, whether or not they agree: the
optimizer's param_groups (which differ between pipeline stages) are therefore not saved; they come from the recipe.
Every DTensor's local tensor is a view of the live parameter or moment, so a DCP load fills them in place.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from ebwm_scale.parallel.plans import plan_for
from ebwm_scale.parallel.tensor import sharded_weights


def stacked_weights(objective: Any) -> dict[str, int]:
    """state_dict key -> number of matrices stacked along its rows (q, k, v), as the model's plan names them."""
    model = objective.model
    layers = plan_for(model).tp_layers(model)
    return {f"model.{path}.weight": layer.stacked for path, layer in layers.items() if layer.stacked > 1}


def tp_shard_dims(module: nn.Module) -> dict[str, int]:
    """state_dict key -> the dimension tensor parallelism splits it along."""
    return {key: layer.shard_dim for key, layer in sharded_weights(module)}


def _to_form(tensor: torch.Tensor, blocks: int, mesh, tp_dim: int | None) -> torch.Tensor:
    """`mesh`: the (dp, pp, tp) mesh of a tensor-parallel module, else None; tp_dim: the dimension tensor parallelism
    splits this tensor along (None: replicated over the tensor-parallel ranks)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    shape = list(tensor.shape)  # FSDP: the whole of this rank's tensor-parallel piece
    if blocks > 1:
        local = local.view(blocks, -1, *local.shape[1:])
        shape = [blocks, shape[0] // blocks, *shape[1:]]
    form_dim = None if tp_dim is None else tp_dim + (1 if blocks > 1 else 0)
    if form_dim is not None:
        shape[form_dim] *= mesh["tp"].size()
    tp_placement = Replicate() if form_dim is None else Shard(form_dim)
    if isinstance(tensor, DTensor):  # FSDP: Shard(d) over its mesh, never along the stacked rows
        (placement,) = tensor.placements
        fsdp_dim = cast(Shard, placement).dim + (1 if blocks > 1 else 0)
        assert blocks == 1 or fsdp_dim > 1, "stacked weights must be sharded along D_in"
        placements: list[Placement]
        if mesh is None:
            device_mesh, placements = tensor.device_mesh, [Shard(fsdp_dim)]
        else:  # FSDP x TP: a box of the (dp, tp) grid; the two never split the same dimension (FSDPEngine)
            device_mesh, placements = mesh["dp", "tp"], [Shard(fsdp_dim), tp_placement]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            local, device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
        )
    if form_dim is None:
        return local
    return DTensor.from_local(local, mesh["tp"], [tp_placement], run_check=False)


def _from_form(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The loaded checkpoint-form tensor in the shape of the live one (a view: no copy)."""
    local = saved.to_local() if isinstance(saved, DTensor) else saved
    if isinstance(like, DTensor):
        return DTensor.from_local(
            local.view(like.to_local().shape),
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )
    return local.view(like.shape)


def checkpoint_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    mesh=None,
    moments: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """{"model": ..., "optim": ...} in checkpoint form (see the module docstring); without an optimizer (DeepSpeed
    keeps its own) only "model". `mesh`: the (dp, pp, tp) mesh of a tensor-parallel module.
    `moments` (instead of `optimizer`): the per-parameter optimizer state this rank owns under ZeRO-1, by state_dict
    key; a key only its owners hold is written by them and read back by whoever owns it on load."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    # DCP types its state dicts as unions of every value it can hold; these hold tensors (and the optimizer's step)
    model: dict[str, Any]
    optim: dict[str, Any] | None
    if optimizer is None:
        model, optim = dict(get_model_state_dict(module)), None if moments is None else {"state": moments}
    else:
        full_model, full_optim = get_state_dict(module, optimizer)
        model, optim = dict(full_model), dict(full_optim)
    stacked, tp_dims = stacked_weights(module), tp_shard_dims(module) if mesh is not None else {}

    def form(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return _to_form(tensor, stacked.get(key, 1), mesh, tp_dims.get(key))

    state: dict[str, Any] = {"model": {key: form(key, value) for key, value in model.items()}}
    if optim is not None:  # per-parameter state only: the hyper-parameters come from the recipe
        state["optim"] = {
            key: {name: form(key, value) if name != "step" else value for name, value in moments.items()}
            for key, moments in optim["state"].items()
        }
    return state


def load_checkpoint_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Apply a checkpoint-form state that DCP has filled (in place of checkpoint_state's output)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    live_model: dict[str, Any]
    live_optim: dict[str, Any] = {}
    if optimizer is None:
        live_model = dict(get_model_state_dict(module))
    else:
        full_model, full_optim = get_state_dict(module, optimizer)
        live_model, live_optim = dict(full_model), dict(full_optim)
    model: dict[str, Any] = {key: _from_form(value, live_model[key]) for key, value in state["model"].items()}
    if optimizer is None:
        set_model_state_dict(module, model)
        return
    moments = {
        key: {
            name: _from_form(value, live_optim["state"][key][name]) if name != "step" else value
            for name, value in per_param.items()
        }
        for key, per_param in state["optim"].items()
    }
    optim: dict[str, Any] = {"state": moments, "param_groups": live_optim["param_groups"]}
    set_state_dict(module, optimizer, model_state_dict=model, optim_state_dict=optim)
