"""Data parallelism on 2 gloo ranks equals one process on the whole batch, second-order EBT gradients included."""

import json
import subprocess
import sys

import torch

from ebwm_scale.mcmc import MCMCConfig
from ebwm_scale.objective import EBTObjective
from ebwm_scale.parallel.dist import all_reduce_gradients, all_reduce_mean
from tests.conftest import REPO, tiny_model_config
from tests.distributed import free_port, run_distributed_test


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


def test_torchrun_two_ranks_match_one_process_end_to_end(tmp_path):
    """`torchrun --nproc-per-node 2 pretrain.py` (gloo) follows the same loss curve as one process on the same
    global batch: the sampler gives the ranks disjoint halves of it, and gradients are averaged."""
    common = [
        str(REPO / "recipes" / "ci_tiny_ar.yaml"),
        "model.dim=64",
        "data.seq_len=16",
        "train.max_steps=5",
        "tracking.enabled=false",
        "train.progress_bar=false",
        "train.eval_batches=2",
        "optim.warmup_steps=1",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}"]
    runs = {
        "two": [*launch, str(REPO / "ebwm_scale" / "pretrain.py"), *common, "data.micro_batch_size=4"],
        "one": [sys.executable, str(REPO / "ebwm_scale" / "pretrain.py"), *common, "data.micro_batch_size=8"],
    }
    summaries = {}
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = subprocess.run([*cmd, f"train.output_dir={out}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[name] = json.loads((out / "ci_tiny_ar" / "summary.json").read_text())
    for key in ("train_loss", "eval_loss"):
        assert abs(summaries["two"][key] - summaries["one"][key]) < 1e-4 * abs(summaries["one"][key]), key
    assert summaries["two"]["tokens"] == summaries["one"]["tokens"]
