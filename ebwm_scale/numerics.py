"""Numeric and autograd helpers shared by the models and the MCMC core."""

from __future__ import annotations

import torch
from torch.autograd.graph import Node, get_gradient_edge


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reductions in fp32 under bf16; float64 stays float64 (gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def matmul_dtype(device_type: str, like: torch.Tensor) -> torch.dtype:
    """What autocast would run a Function's matmuls in; recorded at forward so that its backward passes, which may
    run outside autocast, agree with it."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: FLOP counting, no autocast
        return torch.get_autocast_dtype(device_type)
    return like.dtype


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with both operands cast to dtype, whatever autocast says."""
    if a.device.type == "meta":
        return a.to(dtype) @ b.to(dtype)
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


def engine_visible(x: torch.Tensor) -> torch.Tensor:
    """The engine answers "will x's gradient be computed?" (engine_wants) only for non-leaf nodes during
    autograd.grad; a free view gives a leaf such a node."""
    return x.view_as(x) if x.requires_grad and x.grad_fn is None else x


def gradient_node(x: torch.Tensor) -> Node | None:
    """x's gradient node, captured in a Function's forward for engine_wants (x passed through engine_visible)."""
    return get_gradient_edge(x).node if x.grad_fn is not None else None


def engine_wants(ctx, index: int, node: Node | None) -> bool:
    """Whether a Function's backward must compute the gradient of input `index`, whose gradient_node is `node`:
    inside the MCMC's autograd.grad(E, state) the weights' and the context's gradients are not used."""
    return ctx.needs_input_grad[index] and (node is None or torch._C._will_engine_execute_node(node))
