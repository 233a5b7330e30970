"""Data parallelism on 2 gloo ranks equals one process on the whole batch, second-order EBT gradients included."""

import os
import re
import sys

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import EBTObjective
from ebwm_scale.parallel.dist import all_reduce_gradients, all_reduce_mean
from tests.conftest import tiny_model_config
from tests.distributed import free_port, run_distributed_test
from tests.helpers import assert_same_curve, train_launched


def _objective_and_batch():
    torch.manual_seed(0)
    # init_scale=0 starts every chain from the same state, so the ranks' halves and the full batch see equal inputs.
    objective = EBTObjective(tiny_model_config("ebt", "text").build(), MCMCConfig(alpha_init=5.0, init_scale=0).build())
    batch = {"tokens": torch.randint(0, 32, (8, 9))}
    return objective, batch


def _grads(objective):
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def _check_data_parallel_parity(rank, world_size):
    torch.set_default_dtype(torch.float64)  # a wrong reduction shows far above the rounding of another sum order
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
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    mean_loss = all_reduce_mean({"loss": float(out.loss)}, world_size)["loss"]
    assert abs(mean_loss - float(reference(batch).loss)) < 1e-10


def test_data_parallel_gradients_match_single_process():
    run_distributed_test(_check_data_parallel_parity, world_size=2)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_end_to_end(tmp_path):
    """`torchrun --nproc-per-node 2 pretrain.py` (gloo) follows the same loss curve as one process on the same
    global batch: the sampler gives the ranks disjoint halves of it, and gradients are averaged."""
    one = train_launched([[sys.executable]], tmp_path / "one", "data.micro_batch_size=8")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}"]
    logs = []
    overrides = ["data.micro_batch_size=4", "train.log_all_ranks=true"]
    assert_same_curve(train_launched([launch], tmp_path / "two", *overrides, logs=logs), one)
    for rank in (0, 1):  # every rank logs, each line with its time and rank
        assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d rank {rank}: step 5/5 \| loss", logs[0], re.M)


@pytest.mark.slow
def test_torchrun_on_two_nodes_matches_one_process(tmp_path):
    """Two torchrun launchers, node_rank 0 and 1 of `--nnodes 2`, rendezvous on 127.0.0.1 as two cluster nodes
    would on the first node's address: the same curve as one process."""
    one = train_launched([[sys.executable]], tmp_path / "one", "data.micro_batch_size=8")
    port = free_port()
    nodes = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
        ]
        for node in (0, 1)
    ]
    logs = []
    assert_same_curve(train_launched(nodes, tmp_path / "nodes", "data.micro_batch_size=4", logs=logs), one)
    assert "rank 0: step 5/5" in logs[0] and "rank 1: step" not in logs[1]  # by default rank 0 alone logs


@pytest.mark.slow
def test_one_process_with_a_process_group_trains_like_one_without(tmp_path):
    """parallel.force_distributed opens a 1-rank group (in memory: no port) so every collective of a step runs (the
    1-GPU check of the NCCL path); ZeRO always opens one, since DeepSpeed needs it. Neither changes a loss."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    _, plain = train_launched([[sys.executable]], tmp_path / "plain", env=env)
    assert len(plain) == 5
    assert (
        train_launched([[sys.executable]], tmp_path / "forced", "parallel.force_distributed=true", env=env)[1] == plain
    )
    zero = train_launched(
        [[sys.executable]], tmp_path / "zero", "parallel.data_parallel=zero", "parallel.zero_stage=2", env=env
    )
    assert zero[1] == pytest.approx(plain, rel=1e-5)
