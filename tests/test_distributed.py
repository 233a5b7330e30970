"""Data parallelism on 2 gloo ranks equals one process on the whole batch, second-order EBT gradients included."""

import torch

from ebwm_scale.mcmc import MCMCConfig
from ebwm_scale.objective import EBTObjective
from ebwm_scale.parallel.dist import all_reduce_gradients, all_reduce_mean
from tests.conftest import tiny_model_config
from tests.distributed import run_distributed_test


def _objective_and_batch():
    torch.manual_seed(0)
    # init_scale=0 starts every chain from the same state, so the ranks' halves and the full batch see equal inputs.
    objective = EBTObjective(tiny_model_config("ebt", "text").build(), MCMCConfig(alpha_init=5.0, init_scale=0).build())
    batch = {"tokens": torch.randint(0, 32, (8, 9))}
    return objective, batch


def _grads(objective):
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def _check_data_parallel_parity(rank, world_size):
    reference, batch = _objective_and_batch()
    reference(batch).loss.backward()
    expected = _grads(reference)

    objective, batch = _objective_and_batch()
    half = batch["tokens"].shape[0] // world_size
    local = {"tokens": batch["tokens"][rank * half : (rank + 1) * half]}
    out = objective(local)
    out.loss.backward()
    params = [p for p in objective.parameters() if p.requires_grad]
    all_reduce_gradients(params, world_size)
    got = _grads(objective)
    assert got.keys() == expected.keys() and "mcmc.alpha" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    mean_loss = all_reduce_mean({"loss": float(out.loss)}, world_size)["loss"]
    assert abs(mean_loss - float(reference(batch).loss)) < 1e-5


def test_data_parallel_gradients_match_single_process():
    run_distributed_test(_check_data_parallel_parity, world_size=2)
