"""Prediction-stream recompute (parallel.prediction_recompute): an EBT prediction block keeps only its inputs through
both backwards of the MCMC loss.

Each MCMC step takes the energy's gradient with a graph (the inner backward), which the loss then differentiates (the
outer backward). Activation checkpointing drops what a block's forward saves, but the inner backward's own nodes,
built with create_graph=True, still save the block's every intermediate (attention probabilities, the SwiGLU
hidden units) for the outer one. Here a prediction block out = f(h, kv, θ) becomes two Functions:

- _BlockForward: f without a graph; saves its inputs. Its backward, given G = dE/dout, is _BlockVJP.
- _BlockVJP: (dh, dkv, dθ) = G^T df/d(h, kv, θ) from a recomputed f, no graph kept, and only the gradients the
  running backward uses (the inner one only needs dh); saves its inputs and G. Its backward recomputes f and that
  vector-Jacobian product with a graph and differentiates them: the outer backward's second-order part.

So per block and MCMC step the graph keeps h and G (plus the context keys/values and the weights, kept anyway), and f
runs four times instead of once: the forward, the inner backward, and in the outer backward both the second-order
part and the first-order one (through _BlockForward, as activation checkpointing would).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torch.func import functional_call

Autocast = tuple[str, bool, torch.dtype]  # the forward's (device type, enabled, dtype), which recomputes repeat


def _recompute(block: nn.Module, names: tuple[str, ...], autocast: Autocast, cos, sin, inputs) -> torch.Tensor:
    """f of the block at `inputs` = (h, k, v, *parameters named `names`), under the forward's autocast."""
    # Views: hooks that ask the engine about a module's inputs (torch's module tracker) refuse leaves in autograd.grad.
    h, k, v, *params = (_with_node(tensor) for tensor in inputs)
    device_type, enabled, dtype = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return functional_call(block, dict(zip(names, params)), (h, cos, sin), {"kv_ctx": (k, v)})


def _node(tensor: torch.Tensor):
    """The node that receives `tensor`'s gradient (None if it needs none)."""
    return get_gradient_edge(tensor).node if tensor.requires_grad else None


def _with_node(tensor: torch.Tensor) -> torch.Tensor:
    """The engine says whether it will run a node only for non-leaf ones: a free view gives a leaf such a node."""
    return tensor.view_as(tensor) if tensor.requires_grad and tensor.grad_fn is None else tensor


class _BlockForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, names, autocast, cos, sin, *inputs):
        ctx.block, ctx.names, ctx.autocast = block, names, autocast
        ctx.nodes = [_node(tensor) for tensor in inputs]
        ctx.save_for_backward(cos, sin, *inputs)
        h, k, v = inputs[:3]
        return block(h, cos, sin, kv_ctx=(k, v))  # (B, S, D)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, *inputs = ctx.saved_tensors
        # Inside the MCMC's autograd.grad(E, state) only dh is used: the context's and the weights' nodes do not run.
        wanted = tuple(node is not None and torch._C._will_engine_execute_node(node) for node in ctx.nodes)
        grads = _BlockVJP.apply(ctx.block, ctx.names, ctx.autocast, wanted, cos, sin, grad, *inputs)
        return None, None, None, None, None, *grads


class _BlockVJP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, names, autocast, wanted, cos, sin, grad, *inputs):
        ctx.block, ctx.names, ctx.autocast = block, names, autocast
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos, sin, grad, *inputs)
        with torch.enable_grad():
            leaves = [tensor.detach().requires_grad_(want) for tensor, want in zip(inputs, wanted)]
            out = _recompute(block, names, autocast, cos, sin, leaves)
            used = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(out, used, grad))
        return tuple(next(grads) if want else None for want in wanted)

    @staticmethod
    def backward(ctx, *cotangents):
        # The vector-Jacobian product is differentiated below without a graph: a further derivative would be zero.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a third derivative of a prediction-stream block under parallel.prediction_recompute is not implemented"
            )
        cos, sin, grad, *inputs = ctx.saved_tensors
        needed = ctx.needs_input_grad[6:]  # grad, *inputs
        with torch.enable_grad():
            grad_leaf = grad.detach().requires_grad_(needed[0])
            leaves = [
                tensor.detach().requires_grad_(need or cot is not None)
                for tensor, need, cot in zip(inputs, needed[1:], cotangents)
            ]
            out = _recompute(ctx.block, ctx.names, ctx.autocast, cos, sin, leaves)
            differentiated = [(leaf, cot) for leaf, cot in zip(leaves, cotangents) if cot is not None]
            firsts = torch.autograd.grad(
                out, [leaf for leaf, _ in differentiated], grad_leaf, create_graph=True, allow_unused=True
            )
            pairs = [(first, cot) for first, (_, cot) in zip(firsts, differentiated) if first is not None]
            targets = [leaf for leaf, need in zip((grad_leaf, *leaves), needed) if need]
            seconds = iter(
                torch.autograd.grad([f for f, _ in pairs], targets, [c for _, c in pairs], allow_unused=True)
                if pairs and targets
                else [None] * len(targets)
            )
        return None, None, None, None, None, None, *(next(seconds) if need else None for need in needed)


class PredictionRecompute(ActivationWrapper):
    """A transformer block whose EBT prediction-stream calls (kv_ctx given, training, grad enabled) keep only their
    inputs through both backwards (see the module's docstring); every other call (the context stream, AR and
    masked-layout blocks, evaluation) runs the block as it is. Like torch's checkpoint wrapper (the same base), it
    keeps the block's state_dict keys."""

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        block = self._checkpoint_wrapped_module
        prediction = not args and kwargs.keys() == {"kv_ctx"} and kwargs["kv_ctx"] is not None
        if not (prediction and self.training and torch.is_grad_enabled()):
            return block(h, cos, sin, *args, **kwargs)
        names, params = zip(*block.named_parameters())
        autocast = (h.device.type, torch.is_autocast_enabled(h.device.type), torch.get_autocast_dtype(h.device.type))
        inputs = (h, *kwargs["kv_ctx"], *params)
        return _BlockForward.apply(block, names, autocast, cos, sin, *(_with_node(tensor) for tensor in inputs))
