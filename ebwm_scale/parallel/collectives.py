"""Every collective this package issues itself, in one place, with one rule: a tensor goes only to a process group
that has a backend for its device type.

An NCCL-only group has no CPU backend ("No backend type associated with device type cpu"), so a CPU tensor sent
through it fails on the first step of a GPU run while every CPU test passes. `init_distributed` therefore opens the
group with a device-backend map (`cpu:gloo,cuda:nccl` on GPU) that sub-groups inherit, and each call here checks the
tensor's device against its group's map, naming the call in a one-line error instead of a mid-run crash.
Collectives inside torch (FSDP2, DeviceMesh) and DeepSpeed move device tensors and are not routed here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


class CollectiveDeviceError(RuntimeError):
    """A tensor on a device type that the process group has no backend for."""


def served_device_types(group: Any = None) -> set[str]:
    """The device types `group` (None: the default group) has a backend for, read from its backend map: a plain
    "gloo" group reads "cpu:gloo,cuda:gloo", an NCCL-only group "cuda:nccl"."""
    config = dist.get_backend_config(group)
    return {entry.split(":", 1)[0] for entry in config.split(",")}


def check_device(tensor: torch.Tensor, group: Any, what: str) -> None:
    served = served_device_types(group)
    if tensor.device.type not in served:
        raise CollectiveDeviceError(
            f"{what}: a {tensor.device.type} tensor on a process group with backends only for "
            f"{', '.join(sorted(served))} ({dist.get_backend_config(group)}); open the group with a backend for "
            f"{tensor.device.type} (parallel.backend) or move the tensor to the group's device"
        )


def all_reduce(tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None) -> None:
    check_device(tensor, group, "all_reduce")
    dist.all_reduce(tensor, op=op, group=group)


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group: Any = None) -> None:
    check_device(tensor, group, "all_gather")
    dist.all_gather(parts, tensor, group=group)


def reduce(tensor: torch.Tensor, group_dst: int, group: Any = None) -> None:
    """Sum onto the rank with index `group_dst` in `group`."""
    check_device(tensor, group, "reduce")
    dist.reduce(tensor, group=group, group_dst=group_dst)


def reduce_scatter(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> None:
    """output = this rank's chunk (along dim 0) of the sum of `tensor` over the group."""
    check_device(tensor, group, "reduce_scatter")
    dist.reduce_scatter_single(output, tensor, group=group)


def broadcast(tensor: torch.Tensor, group: Any = None, group_src: int = 0) -> None:
    check_device(tensor, group, "broadcast")
    dist.broadcast(tensor, group=group, group_src=group_src)


def isend(tensor: torch.Tensor, peer: int) -> Any:
    check_device(tensor, None, "isend")
    return dist.isend(tensor, peer)


def recv(tensor: torch.Tensor, peer: int) -> None:
    check_device(tensor, None, "recv")
    dist.recv(tensor, peer)


def barrier(group: Any = None) -> None:
    dist.barrier(group=group)


def unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive pieces of `flat` back into `tensors`: the inverse of a torch.cat of their flattened views, for
    a collective run once on one flat buffer."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def all_gather_object(values: list[Any], value: Any, group: Any = None) -> None:
    """Pickled Python objects; torch stages them on the device its backend needs."""
    dist.all_gather_object(values, value, group=group)


def broadcast_object_list(values: list[Any], src: int = 0) -> None:
    dist.broadcast_object_list(values, src=src)
