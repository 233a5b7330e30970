"""One init path for every launcher: torchrun and the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK) and SLURM
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/MASTER_PORT from the batch script, or else the job's first
node and a port derived from SLURM_JOB_ID).

Data parallelism is a plain all-reduce of the accumulated gradients after the outer backward: it sits outside the
double-backward graph, so it is correct for the EBT loss by construction (DDP's autograd hooks are not).
"""

from __future__ import annotations

import gc
import os
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ebwm_scale.errors import UserError
from ebwm_scale.parallel import collectives
from ebwm_scale.schema import Choice, non_negative, positive


class Backend(Choice):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class DataParallel(Choice):
    ddp = "ddp"
    zero = "zero"
    fsdp = "fsdp"


class ActivationCheckpointing(Choice):
    none = "none"
    full = "full"
    selective = "selective"


@dataclass(kw_only=True)
class ParallelConfig:
    # auto: nccl for GPU tensors, gloo for CPU ones (metrics, stop flags), as one group with a device-backend map
    backend: Backend = Backend.auto
    init_timeout_s: int = 1800  # how long a collective (and the first rendezvous) waits before the run fails
    # ddp: replicated parameters and optimizer, gradients averaged after the outer backward (our own all-reduce).
    # zero: DeepSpeed ZeRO with parallel.zero_stage (0: DeepSpeed's data parallel, 1: optimizer states sharded,
    # 2: + gradients sharded). fsdp: parameters, gradients and optimizer states sharded (torch FSDP2; ZeRO-3's memory
    # model, made safe for the EBT's double backward).
    data_parallel: DataParallel = DataParallel.ddp
    zero_stage: int = 1  # under zero: 0, 1 (optimizer), 2 (+ gradients) or 3 (+ parameters) sharded
    # ddp only: ZeRO-1 by torch's ZeroRedundancyOptimizer over each (pipeline, tensor) coordinate's data-parallel
    # group; each rank keeps its share of the AdamW state (parallel/zero.py). Composes with tensor and pipeline
    # parallelism, as Megatron's distributed optimizer does.
    shard_optimizer: bool = False
    deepspeed_config: str = ""  # a DeepSpeed JSON whose keys are added to the generated config; conflicts are errors
    tensor_parallel: int = 1  # ranks that split each layer (Megatron layout); the rest of the world is data parallel
    # Megatron's sequence parallelism on top of tensor_parallel: norms and the residual stream between the
    # tensor-parallel regions keep only this rank's rows of the sequence (parallel/tensor.py)
    sequence_parallel: bool = False
    pipeline_parallel: int = 1  # stages of consecutive blocks, one per rank (parallel/pipeline.py)
    pipeline_microbatches: int = 4  # each rank's batch is cut into this many, in flight through the stages at once
    # Recompute transformer blocks in the backward instead of storing their activations: full = every block,
    # selective = every second block.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    # EBT split layout: recompute prediction-stream blocks in both backwards of the MCMC loss, so that per MCMC step a
    # block keeps only its input and the energy gradient reaching it (activation checkpointing leaves the graph of that
    # gradient, the larger part; parallel/recompute.py). full = every block, selective = every second block. Only with
    # parallel.data_parallel=ddp, without tensor/pipeline parallelism, compile or activation checkpointing.
    prediction_recompute: ActivationCheckpointing = ActivationCheckpointing.none
    # torch.compile (inductor) where no second-order gradient passes (parallelize.apply_compile): every AR block; the
    # EBT's real-token stream. Compiled graphs have no double backward, so the EBT's prediction stream stays eager.
    compile: bool = False
    # The number of ranks the run was planned for (ladders set it: their budgets assume it); 0 = any. A launch with
    # another number of ranks stops at start instead of training a different number of tokens than labelled.
    expected_world_size: int = 0
    # Open a process group even for one process, so that every collective of a step runs (a 1-GPU check of the NCCL
    # path). ZeRO always has one: DeepSpeed needs it.
    force_distributed: bool = False

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "parallel", "init_timeout_s")
        problems += non_negative(self, "parallel", "expected_world_size")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"parallel.zero_stage={self.zero_stage} is not one of 0, 1, 2, 3")
        if self.shard_optimizer and self.data_parallel != DataParallel.ddp:
            problems.append(
                f"parallel.shard_optimizer=true is ZeRO-1 for parallel.data_parallel=ddp; under "
                f"{self.data_parallel} the optimizer state is already sharded"
            )
        tp, pp, chunks = self.tensor_parallel, self.pipeline_parallel, self.pipeline_microbatches
        if tp < 1:
            problems.append(f"parallel.tensor_parallel={tp} must be >= 1")
        elif tp > 1 and self.data_parallel == DataParallel.zero:
            problems.append(
                f"parallel.tensor_parallel={tp} with DeepSpeed ZeRO: use parallel.data_parallel=ddp with "
                "parallel.shard_optimizer=true (ZeRO-1 over the data-parallel group) or parallel.data_parallel=fsdp"
            )
        if pp < 1 or chunks < 1:
            problems.append(f"parallel.pipeline_parallel={pp} and parallel.pipeline_microbatches={chunks} must be >= 1")
        elif pp > 1 and self.data_parallel != DataParallel.ddp:
            problems.append(
                f"parallel.pipeline_parallel={pp} with {self.data_parallel}: use parallel.data_parallel=ddp "
                "with parallel.shard_optimizer=true (ZeRO-1 over each stage's data-parallel group)"
            )
        if self.sequence_parallel and (tp < 2 or pp > 1 or self.data_parallel != DataParallel.ddp):
            problems.append(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1, parallel.pipeline_parallel=1 and "
                "parallel.data_parallel=ddp"
            )
        if self.compile and (self.data_parallel != DataParallel.ddp or tp > 1 or pp > 1):
            problems.append(
                "parallel.compile=true works with parallel.data_parallel=ddp and no tensor/pipeline parallelism"
            )
        recompute = self.prediction_recompute
        if recompute != "none" and (self.data_parallel != DataParallel.ddp or tp > 1 or pp > 1 or self.compile):
            problems.append(
                f"parallel.prediction_recompute={recompute} works with parallel.data_parallel=ddp and no "
                "tensor/pipeline parallelism or compile (the others are not tested with it)"
            )
        elif recompute != "none" and self.activation_checkpointing != "none":
            problems.append(
                f"parallel.prediction_recompute={recompute} with parallel.activation_checkpointing="
                f"{self.activation_checkpointing}: use one (both would recompute the prediction blocks)"
            )
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            problems.append(f"parallel.deepspeed_config={self.deepspeed_config!r}: no such file")
        return problems


class LaunchError(UserError, RuntimeError):
    """The launch does not fit the recipe: rank count, device, rendezvous."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. Ranks form a (data parallel x pipeline x tensor parallel) grid, tensor-parallel ranks
    adjacent: rank = (dp_rank * pp_size + pp_rank) * tp_size + tp_rank. The tensor-parallel ranks and pipeline stages
    of one data-parallel replica see the same data and the same MCMC noise."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    tp_size: int = 1
    pp_size: int = 1
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mesh: Any = None  # the (dp, pp, tp) DeviceMesh when tp or pp > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp_size * self.pp_size)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage; its neighbours are the ranks tp_size below and above."""
        return self.rank // self.tp_size % self.pp_size


def _launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/deepspeed, else SLURM, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 0, 1


SLURM_BASE_PORT = 20000


def slurm_rendezvous() -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) for srun-launched ranks: the job's first node, and a port derived from the job id
    (so two jobs sharing a node do not collide)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM ranks without MASTER_ADDR need SLURM_JOB_NODELIST to find the first node")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol: {error}") from None
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    port = SLURM_BASE_PORT + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000
    return hosts[0], str(port)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError("train.device=cuda but torch sees no CUDA device (CPU-only torch build?)")
        # Modulo: under `srun --gpus-per-task=1` each task sees one GPU whatever its local rank.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)


def process_group_backend(backend: str, device: torch.device) -> str:
    """The backend string for init_process_group: gloo on CPU; on GPU a map that gives CPU tensors gloo and GPU
    tensors nccl (or gloo everywhere when asked), so no collective meets a group without a backend for its device."""
    if device.type == "cpu":
        if backend == "nccl":
            raise LaunchError("parallel.backend=nccl needs CUDA tensors; this run's device is cpu (use gloo or auto)")
        return "gloo"
    if backend == "gloo":
        return "gloo"
    return f"cpu:gloo,{device.type}:nccl"


def init_distributed(cfg: ParallelConfig, device: str) -> DistInfo:
    rank, local_rank, world_size = _launcher_env()
    info = DistInfo(rank, local_rank, world_size, resolve_device(device, local_rank))
    if cfg.expected_world_size and world_size != cfg.expected_world_size:
        raise LaunchError(
            f"this run is planned for {cfg.expected_world_size} ranks (parallel.expected_world_size) but was launched "
            f"on {world_size}; launch it with ebwm-ladder, or e.g. torchrun --nproc-per-node {cfg.expected_world_size}"
        )
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel
    if world_size % model_parallel:
        raise LaunchError(
            f"parallel.tensor_parallel={cfg.tensor_parallel} x parallel.pipeline_parallel={cfg.pipeline_parallel} "
            f"does not divide the {world_size} ranks"
        )
    wants_group = world_size > 1 or cfg.force_distributed or cfg.data_parallel == "zero"
    if wants_group and not dist.is_initialized():
        # DeepSpeed reads these, which srun and a lone process do not set
        for var, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
            os.environ.setdefault(var, str(value))
        # A lone process rendezvous with itself in memory: no port to pick, so none that another process can take.
        store = dist.HashStore() if world_size == 1 and "MASTER_ADDR" not in os.environ else None
        if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ and store is None:
            os.environ["MASTER_ADDR"], port = slurm_rendezvous()
            os.environ.setdefault("MASTER_PORT", port)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ and store is None:
                raise LaunchError(f"{var} is not set: the launcher (or the SLURM batch script) must export it")
        dist.init_process_group(
            process_group_backend(cfg.backend, info.device),
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=cfg.init_timeout_s),
            device_id=info.device if info.device.type == "cuda" else None,  # binds NCCL communicators eagerly
        )
    return with_parallel_groups(info, cfg.tensor_parallel, cfg.pipeline_parallel)


def with_parallel_groups(info: DistInfo, tp_size: int, pp_size: int = 1) -> DistInfo:
    """Adds the data-parallel, pipeline and tensor-parallel process groups of the (dp, pp, tp) grid (every rank must
    call this)."""
    if tp_size == pp_size == 1:
        return info
    from torch.distributed.device_mesh import init_device_mesh

    shape = (info.world_size // (tp_size * pp_size), pp_size, tp_size)
    mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=("dp", "pp", "tp"))
    groups = {name: mesh.get_group(name) for name in ("dp", "pp", "tp")}
    return replace(
        info,
        tp_size=tp_size,
        pp_size=pp_size,
        tp_group=groups["tp"],
        pp_group=groups["pp"],
        dp_group=groups["dp"],
        mesh=mesh,
    )


def all_reduce_gradients(params: list[torch.nn.Parameter], dp_size: int, group: Any = None) -> None:
    """Average .grad over the data-parallel ranks (`group`; None = all ranks), in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not dist.is_initialized() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    collectives.all_reduce(flat, group=group)
    flat /= dp_size
    collectives.unflatten_into(grads, flat)


def all_reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    buffer = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    collectives.all_reduce(buffer)
    return {k: float(v) / world_size for k, v in zip(keys, buffer)}


def shutdown_distributed(clean_exit: bool = True) -> None:
    if dist.is_initialized():
        # Objects in reference cycles (the trainer and its callbacks, an engine, autograd graphs) can hold the groups;
        # freed at interpreter exit, after the groups are gone, they can abort the process. Free them now.
        gc.collect()
        if clean_exit:
            # A rank that tears gloo down while a peer still talks to it can abort the peer ("terminate called
            # without an active exception"); after an error a peer may never arrive, so no barrier then.
            collectives.barrier()
        dist.destroy_process_group()
