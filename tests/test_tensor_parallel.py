"""Tensor parallelism on 2 gloo ranks vs one process: energies, the energy gradient w.r.t. the state, 3 training
steps, and every parameter gradient (each rank's shard against the same slice of the full gradient)."""

import copy

import pytest
import torch
import torch.distributed as dist

from ebwm_scale.mcmc import MCMCConfig
from ebwm_scale.objective import build_objective
from ebwm_scale.parallel.parallelize import apply_tensor_parallel
from ebwm_scale.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _shard,
    reduce_from_tp,
)
from tests.conftest import tiny_model_config
from tests.distributed import run_distributed_test

RTOL, ATOL = 1e-5, 1e-5  # ATOL for near-zero entries, where summing partial products in another order shows


def _expected_shard(module, name, full_grad, rank, size):
    """The slice of the one-process gradient that this rank's shard of `name` must equal."""
    if isinstance(module, ColumnParallelLinear):
        return _shard(full_grad, 0, rank, size, module.blocks)
    if isinstance(module, RowParallelLinear):
        return _shard(full_grad, 1, rank, size)
    if isinstance(module, VocabParallelEmbedding):
        return _shard(full_grad, 0, rank, size)
    return full_grad  # replicated


def _batch(modality):
    torch.manual_seed(7)
    return {"tokens": torch.randint(0, 32, (3, 9))} if modality == "text" else {"frames": torch.randn(3, 9, 8)}


def _check(rank, size, kind, modality):
    group = dist.group.WORLD
    torch.manual_seed(0)
    reference = build_objective(tiny_model_config(kind, modality).build(), MCMCConfig(alpha_init=5.0).build())
    parallel = copy.deepcopy(reference)
    apply_tensor_parallel(parallel.model, group)
    batch = _batch(modality)

    if kind == "ebt":  # energies and the energy gradient w.r.t. the (replicated) state
        ctx = batch["tokens"][:, :-1] if modality == "text" else batch["frames"][:, :-1]
        pred = torch.randn(3, 8, 32 if modality == "text" else 8, requires_grad=True)
        energies, state_grads = [], []
        for objective in (reference, parallel):
            energy = objective.model(ctx, pred)
            energies.append(energy)
            state_grads.append(torch.autograd.grad(energy.sum(), pred)[0])
        torch.testing.assert_close(energies[1], energies[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(state_grads[1], state_grads[0], rtol=RTOL, atol=ATOL)

    optimizers = [torch.optim.SGD(o.parameters(), lr=0.05) for o in (reference, parallel)]
    modules = dict(parallel.named_modules())
    for step in range(3):
        losses = []
        for objective in (reference, parallel):
            torch.manual_seed(100 + step)  # the same MCMC start noise on every rank and for both models
            out = objective(batch)
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=RTOL), (step, losses)
        full = dict(reference.named_parameters())
        for name, param in parallel.named_parameters():
            owner = modules[name.rsplit(".", 1)[0]]
            expected = _expected_shard(owner, name, full[name].grad, rank, size)
            torch.testing.assert_close(param.grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("kind, modality", [("ebt", "text"), ("ebt", "frames"), ("ar", "text")])
def test_tensor_parallel_matches_one_process(kind, modality):
    run_distributed_test(_check, world_size=2, args=(kind, modality))


def _check_second_order_collective(rank, size):
    """d/dx of (d/dx sum(reduce(x * w)^2)): ours vs the analytic value; the naive differentiable all-reduce of
    torch.distributed.nn doubles it (an all-reduce in its backward too), silently."""
    from torch.distributed.nn.functional import all_reduce as naive_all_reduce

    w = torch.tensor([float(rank + 1)])  # rank-dependent weights: wrong reductions show up as wrong numbers
    total_w = sum(r + 1.0 for r in range(size))
    results = {}
    for name, reduce in (("ours", lambda t: reduce_from_tp(t, dist.group.WORLD)), ("naive", naive_all_reduce)):
        x = torch.tensor([1.5], requires_grad=True)
        y = reduce(x * w)  # y = x * sum(w) on every rank
        (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)  # this rank's part: 2 y w
        (gg,) = torch.autograd.grad(g.sum(), x)
        results[name] = gg.item()
    assert results["ours"] == pytest.approx(2 * (rank + 1) * total_w)
    assert results["naive"] != pytest.approx(results["ours"])


def test_our_reduce_is_correct_under_double_backward_where_the_naive_one_is_not():
    run_distributed_test(_check_second_order_collective, world_size=2)
