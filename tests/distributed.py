"""run_distributed_test: spawn `world_size` ranks that rendezvous through a file (no port to race for; gloo, or another
backend string), re-raise the first failure."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, store: str, fn, args, errors, backend: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        gc.collect()  # what fn left in reference cycles may hold the group: freed while the group still exists
        if "cpu" in dist.get_backend_config():  # a group without a CPU backend cannot barrier here
            dist.barrier()  # no rank tears the group down while another still has collectives in flight
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_test(fn, world_size: int = 2, args: tuple = (), backend: str = "gloo") -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    rendezvous = tempfile.mkdtemp(prefix="ebwm-rendezvous-")
    store = str(Path(rendezvous) / "store")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store, fn, args, errors, backend)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    shutil.rmtree(rendezvous, ignore_errors=True)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:  # every rank's traceback: the first to fail is often not the one that reports first
        raise AssertionError("\n".join(failures))
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited abnormally: {bad}"


def launch_entry_point(launcher: str, recipe_args: list[str], timeout: int = 600):
    """Run ebwm_scale/pretrain.py on 2 CPU ranks under `torchrun` or the `deepspeed` launcher; returns the process."""
    import subprocess
    import sys
    from pathlib import Path

    entry = str(Path(__file__).resolve().parents[1] / "ebwm_scale" / "pretrain.py")
    launch = {
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            f"--master-port={free_port()}",
        ],
        "deepspeed": [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
        ],
    }[launcher]
    return subprocess.run([*launch, entry, *recipe_args], capture_output=True, text=True, timeout=timeout)


# Trainer-level runs in fp32 against one process. The official update overshoots at initialization (losses in the
# hundreds for the first steps: s' = p - alpha dE/dp with alpha 20), which turns summation-order rounding into
# relative loss differences of up to ~1e-5 after a few AdamW steps. The float64 parity tests pin the gradients
# exactly; these runs check the wiring (groups, data split, sharded weights) end to end.
TRAINER_LOSS_RTOL = 1e-4


def record_gradients(engine) -> list[dict[str, torch.Tensor]]:
    """Every optimizer step's whole gradients, by parameter name, as the optimizer is about to use them (after the
    reduction over ranks and the accumulation scaling): comparing these with one process catches a constant scale
    error, which Adam's g / sqrt(v) would hide in the weights. Every rank must train (full_tensor gathers)."""
    from ebwm_scale.parallel.engines import DeepSpeedEngine

    steps: list[dict[str, torch.Tensor]] = []
    if isinstance(engine, DeepSpeedEngine):
        named = list(engine.engine.module.named_parameters())  # the objective's names, not the wrapper's
        from deepspeed.utils import safe_get_full_grad

        optimizer_step = engine.optimizer_step

        def record_then_finish(skip: bool) -> float:
            steps.append({name: safe_get_full_grad(p).detach().float().clone() for name, p in named})
            return optimizer_step(skip)

        engine.optimizer_step = record_then_finish
    else:
        from ebwm_scale.parallel.tensor import state_key

        # state_dict names (an activation-checkpoint wrapper's part dropped), as the tensor-parallel gather uses
        named = [(state_key(*name.rsplit(".", 1)), p) for name, p in engine.module.named_parameters()]

        def record(optimizer, args, kwargs) -> None:
            whole = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for name, p in named}
            if getattr(engine, "sharded", False):  # ZeRO-1: each data-parallel rank holds its owned gradients
                owned = {name: grad for name, grad in whole.items() if grad is not None}
                shares = [None] * engine.dist.dp_size
                torch.distributed.all_gather_object(shares, owned, group=engine.dist.dp_group)
                whole = {name: grad for share in shares for name, grad in share.items()}
                assert whole.keys() == {name for name, _ in named}
            if engine.dist.tp_size > 1:  # tensor-parallel shards gathered into whole tensors
                from ebwm_scale.parallel.tensor import gather_full_state

                whole = gather_full_state(engine.module, whole)
            steps.append({name: g.detach().float().clone() for name, g in whole.items()})

        optimizer = engine.optimizer.zero if getattr(engine, "sharded", False) else engine.optimizer
        optimizer.register_step_pre_hook(record)
    return steps


def assert_gradients_close(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float, stage: bool = False
) -> None:
    """Per tensor, relative to its own scale: a wrong tensor cannot hide among right ones. stage: `got` holds one
    pipeline stage's parameters, a part of `expected`."""
    assert got.keys() <= expected.keys() if stage else got.keys() == expected.keys()
    for name in got:
        value = expected[name]
        scale = float(value.abs().max())
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol * scale, msg=name)
