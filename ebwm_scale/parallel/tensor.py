"""Megatron-style tensor parallelism whose collectives are differentiable twice (docs/design.md §3, §4).

The EBT loss back-propagates through the energy gradient, so the backward of every collective is itself part of a
graph that gets differentiated again. Two autograd Functions carry the whole scheme, and each one's backward *is* the
other one, applied as an autograd Function:

    copy_to_tp      forward: identity           backward: all-reduce (reduce_from_tp)
    reduce_from_tp  forward: all-reduce (sum)   backward: identity   (copy_to_tp)

so the gradient of a gradient sees the right collective again. These assume what follows a reduce is replicated
(every rank computes the same thing from it). The vocabulary-split softmax divides each rank's own slice by the
summed normalizer, so its sum uses _SumOfSlices, whose backward all-reduces (and is itself). VocabParallel hands
these to the text EBT's state space, which knows no process group.

Measured unsafe (2 gloo ranks, torch 2.13):
megatron-core 0.16's ColumnParallelLinear/RowParallelLinear call `c10d::allreduce_`, which has no autograd kernel;
PyTorch treats it as identity in the double-backward pass and warns that this is deprecated and may silently be
wrong. `torch.distributed.nn.functional.all_reduce` differentiates to another all-reduce, which double-counts
(gradients 3.8x too large, no error). Hence these two Functions; the parity tests are the protection.

Layouts (Y = X A):
- ColumnParallelLinear: A split by columns (output features); input replicated (copy_to_tp), output sharded.
- RowParallelLinear: A split by rows (input features); input sharded, output summed over ranks (reduce_from_tp).
- VocabParallelEmbedding: the table split by vocabulary rows; each rank looks up its rows, then reduce_from_tp.
- The text EBT's V -> D state mapping is a RowParallelLinear: its input is this rank's vocabulary slice.

Sequence parallelism (parallel.sequence_parallel, Megatron's): between the tensor-parallel regions, i.e. in the
residual stream and the blocks' RMSNorms, each rank keeps only its L / tp rows of the sequence (dim 1 of (B, L, D)),
so what they save for the backward shrinks by tp. Four Functions, again in pairs that are each other's backward:

    gather_sequence          forward: all-gather          backward: reduce-scatter (reduce_scatter_sequence)
    reduce_scatter_sequence  forward: reduce-scatter      backward: all-gather     (gather_sequence)
    scatter_to_sequence_parallel    forward: own rows     backward: all-gather     (gather_from_sequence_parallel)
    gather_from_sequence_parallel   forward: all-gather   backward: own rows       (scatter_to_sequence_parallel)

Inside a block, a SequenceParallelRMSNorm gathers the sequence after normalizing (one gather feeds q/k/v, one the
SwiGLU's gate and up: gathering in each column-parallel layer would gather and save the SwiGLU input twice), and the
row-parallel layers reduce-scatter instead of all-reducing. The first block of the trunk enters the region (own rows
of a replicated input) and the last one leaves it (parallelize.apply_sequence_parallel_boundaries).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ebwm_scale.core.vocab_kernels import VocabSplit
from ebwm_scale.models.blocks import RMSNorm
from ebwm_scale.parallel import collectives

SEQUENCE_DIM = 1  # of (B, L, D)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceFromTP.apply(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        collectives.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _CopyToTP.apply(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def _shard(weight: torch.Tensor, dim: int, rank: int, size: int, blocks: int = 1) -> torch.Tensor:
    """This rank's slice along `dim`; with blocks > 1 (e.g. q, k, v stacked) each block is sliced on its own."""
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in weight.chunk(blocks, dim=dim)], dim=dim).clone()


class ColumnParallelLinear(nn.Module):
    """Y_r = X A_r: this rank's output features. `blocks`: the output stacks that many equal parts (q, k, v), each
    split separately so that every rank gets whole heads of each. `sequence_parallel`: X arrives already gathered
    over the sequence (SequenceParallelRMSNorm), whose backward reduce-scatter sums the ranks' input gradients in place
    of copy_to_tp's all-reduce."""

    shard_dim = 0

    def __init__(self, full: nn.Linear, group, blocks: int = 1, sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.blocks = blocks
        self.sequence_parallel = sequence_parallel
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.weight = nn.Parameter(_shard(full.weight.detach(), 0, rank, size, blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self.sequence_parallel else copy_to_tp(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """Y = sum_r X_r A_r: the input arrives sharded over features; partial products are all-reduced, or under
    `sequence_parallel` reduce-scattered: each rank keeps the sum for its own rows of the sequence. Also the EBT's
    V -> D state mapping, whose input is this rank's slice of the vocabulary state."""

    shard_dim, blocks = 1, 1

    def __init__(self, full: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.weight = nn.Parameter(_shard(full.weight.detach(), 1, rank, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return reduce_scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; ids outside it contribute zeros before the all-reduce."""

    shard_dim, blocks = 0, 1

    def __init__(self, full: nn.Embedding, group):
        super().__init__()
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        per_rank = full.num_embeddings // size
        self.start, self.end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(full.weight.detach()[self.start : self.end].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (ids < self.start) | (ids >= self.end)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., D)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(rows, self.group)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    collectives.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The sum over ranks of x, of which this rank keeps its chunk along `dim`."""
    rows = x.movedim(dim, 0).contiguous()  # the collective splits its input along dim 0
    out = rows.new_empty((rows.shape[0] // dist.get_world_size(group), *rows.shape[1:]))
    collectives.reduce_scatter(out, rows, group=group)
    return out.movedim(0, dim)


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather along `dim`; backward: this rank's slice (_SplitToTP), differentiable again. For a result
    that every rank then uses alike (its gradient is the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _SplitToTP.apply(grad, ctx.group, ctx.dim), None, None


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromTP.apply(grad, ctx.group, ctx.dim), None, None


class _GatherSequence(torch.autograd.Function):
    """forward: all-gather the sequence; backward: reduce-scatter, since the column-parallel layers that read the
    gathered rows give each rank only a partial gradient of them."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatterSequence.apply(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """forward: sum the ranks' partial products, keep this rank's rows; backward: all-gather (every addend of a sum
    gets the whole gradient of its rows)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _GatherSequence.apply(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)  # (B, L / tp, D) -> (B, L, D)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSequence.apply(x, group)  # (B, L, D) partial -> (B, L / tp, D) summed


def scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's rows of a replicated (B, L, D): (B, L / tp, D)."""
    length, size = x.shape[SEQUENCE_DIM], dist.get_world_size(group)
    if length % size:
        raise ValueError(
            f"parallel.sequence_parallel splits the sequence over tensor_parallel={size} ranks, but a sequence of "
            f"{length} positions does not divide by {size}"
        )
    return _SplitToTP.apply(x, group, SEQUENCE_DIM)


def gather_from_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """The whole (B, L, D) on every rank from each rank's rows, for replicated computation after the region."""
    return _GatherFromTP.apply(x, group, SEQUENCE_DIM)


class SequenceParallelRMSNorm(RMSNorm):
    """A block's RMSNorm under sequence parallelism: normalizes this rank's rows (B, L / tp, D), then gathers the
    sequence (B, L, D) for the column-parallel layers after it. The gain is the same parameter, replicated, but its
    gradient covers only this rank's rows: all_reduce_sequence_parallel_gradients sums it over the group."""

    def __init__(self, norm: RMSNorm, group):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_sequence(super().forward(x), self.group)


def all_reduce_sequence_parallel_gradients(module: nn.Module) -> None:
    """Sum over the tensor-parallel group the gradients of the gains that saw only this rank's rows (after the outer
    backward, before the data-parallel reduction)."""
    norms = [m for m in module.modules() if isinstance(m, SequenceParallelRMSNorm) and m.weight.grad is not None]
    if not norms:
        return
    grads = [grad for m in norms if (grad := m.weight.grad) is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    collectives.all_reduce(flat, group=norms[0].group)
    collectives.unflatten_into(grads, flat)


class VocabParallelOutput(ColumnParallelLinear):
    """The AR head over a vocabulary split by rank, gathered to full logits for the loss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherFromTP.apply(super().forward(x), self.group, -1)


TENSOR_PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def state_key(module_name: str, tensor: str = "weight") -> str:
    """The state_dict key of a module's tensor: the activation-checkpoint wrapper's name part dropped."""
    return f"{module_name.replace('._checkpoint_wrapped_module', '')}.{tensor}"


def sharded_weights(module: nn.Module):
    """(state_dict key, layer) of every tensor-parallel weight; keys as in the unsharded model."""
    for name, layer in module.named_modules():
        if isinstance(layer, TENSOR_PARALLEL_LAYERS):
            yield state_key(name), layer


def gather_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unsharded state dict from this rank's shards (a collective over each layer's group)."""
    full = dict(state)
    for key, layer in sharded_weights(module):
        shard = state[key].contiguous()
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(layer.group))]
        collectives.all_gather(parts, shard, group=layer.group)
        blocks = [
            torch.cat([p.chunk(layer.blocks, layer.shard_dim)[b] for p in parts], layer.shard_dim)
            for b in range(layer.blocks)
        ]
        full[key] = torch.cat(blocks, dim=layer.shard_dim)
    return full


def shard_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's shards of an unsharded state dict (no communication)."""
    local = dict(state)
    for key, layer in sharded_weights(module):
        rank, size = dist.get_rank(layer.group), dist.get_world_size(layer.group)
        local[key] = _shard(state[key], layer.shard_dim, rank, size, layer.blocks)
    return local


class _SumOfSlices(_ReduceFromTP):
    """The same all-reduce, for a result that feeds rank-local computation (each rank divides its own slice by it):
    the gradient of the sum is the sum of every rank's gradient, so the backward all-reduces too (and is this
    Function again)."""

    @staticmethod
    def backward(ctx, grad):
        return _SumOfSlices.apply(grad, ctx.group), None


class VocabParallel(VocabSplit):
    """The text EBT's vocabulary split over a tensor-parallel group: this rank holds slice `index` of `count` of the
    B x S x V state, of its probabilities and of the V -> D mapping (a RowParallelLinear). The state space
    (core/spaces.py) runs the same math on the slice; these operations make its row reductions span the group.

    What crosses ranks per MCMC step: under the official `probs` rule the softmax's row max and sum (B x S numbers,
    no graph), the candidate embedding (the mapping's all-reduce, B x S x D), and in the backward alpha's and the
    energy gradient's (B x S x D) contributions; dE/dp itself is local (u W_r). Under `logits` also the row sums of
    the softmax's backward. The cross-entropy all-reduces a log-normalizer and the target logit per row."""

    def __init__(self, group):
        self.group = group
        self.index, self.count = dist.get_rank(group), dist.get_world_size(group)

    def sum_ranks(self, x: torch.Tensor) -> torch.Tensor:
        collectives.all_reduce(x, group=self.group)
        return x

    def max_ranks(self, x: torch.Tensor) -> torch.Tensor:
        collectives.all_reduce(x, op=collectives.ReduceOp.MAX, group=self.group)
        return x

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(x, self.group)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(x, self.group)

    def sum_of_slices(self, x: torch.Tensor) -> torch.Tensor:
        return _SumOfSlices.apply(x, self.group)
