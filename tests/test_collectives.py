"""No collective meets a process group without a backend for its tensor's device: the GPU group is opened with a
device-backend map, every collective of the package goes through parallel/collectives.py, and that module refuses
an unserved device with a one-line error. An accelerator-only group ("cuda:gloo", opened on CPU) stands in for the
NCCL-only group that once made every CPU metric tensor fail on a GPU run."""

import ast

import pytest
import torch
import torch.distributed as dist

from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.dist import all_reduce_mean, process_group_backend, resolve_device
from tests.conftest import REPO
from tests.distributed import run_distributed_test

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
}


def test_the_gpu_group_serves_cpu_tensors_with_gloo():
    assert process_group_backend("auto", torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo", torch.device("cuda", 0)) == "gloo"
    assert process_group_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(RuntimeError, match="parallel.backend=nccl needs CUDA tensors"):
        process_group_backend("nccl", torch.device("cpu"))


def test_the_local_rank_wraps_around_the_visible_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: one GPU per task
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert resolve_device("cuda", 3) == torch.device("cuda", 0) and chosen == [0]


def test_every_collective_of_the_package_goes_through_one_module():
    offenders = []
    for path in sorted((REPO / "ebwm_scale").rglob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Attribute) and called.attr in COLLECTIVES:
                owner = ast.unparse(called.value)
                if owner in ("dist", "torch.distributed", "dist_c10d", "c10d"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{called.attr}")
    assert not offenders, offenders


def _accelerator_only_group(rank: int, world_size: int) -> None:
    assert collectives.served_device_types() == {"cuda"}
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(1))  # what torch says mid-run, from wherever the tensor came
    with pytest.raises(collectives.CollectiveDeviceError, match=r"all_reduce: a cpu tensor .* only for cuda"):
        all_reduce_mean({"loss": 1.0}, world_size=2)  # the per-step metric average is refused by name
    with pytest.raises(collectives.CollectiveDeviceError, match="broadcast: a cpu tensor"):
        collectives.broadcast(torch.ones(1))


def _mapped_group(rank: int, world_size: int) -> None:
    assert all_reduce_mean({"loss": float(rank)}, world_size=2) == {"loss": 0.5}
    flag = torch.tensor([rank])
    collectives.all_reduce(flag, op=collectives.ReduceOp.MAX)
    assert int(flag) == 1


def test_an_accelerator_only_group_refuses_cpu_tensors_by_name():
    # "cuda:gloo": gloo serves only CUDA tensors, the shape of an NCCL-only group, on a CPU machine
    run_distributed_test(_accelerator_only_group, backend="cuda:gloo")


def test_a_mapped_group_serves_cpu_tensors():
    run_distributed_test(_mapped_group, backend="cpu:gloo,cuda:gloo")
