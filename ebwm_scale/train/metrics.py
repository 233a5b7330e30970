"""Training FLOPs per token, counted from the run itself, and the other figures a run reports (MFU, memory).

One training step of the whole model (forward, the MCMC energy gradients, the outer backward) runs on the meta device
under a dispatch mode that sums torch's own per-op FLOP formulas (torch.utils.flop_counter): nothing is allocated or
computed, and the count is what the run computes, with its layout, step conditioning (time_token re-runs the context
stream every MCMC step), update rule and vocabulary state. Matmuls, attention and convolutions count, elementwise ops
do not; for an AR model this reproduces the usual 6 N + 12 L D S (PaLM appendix B) within 1 % (tested). Randomized
MCMC step counts (mcmc.max_num_steps, max_steps_per_landscape) count as their expectation: FLOPs are linear in the
step count; replayed sequences (mcmc.replay) add their share of the batch.

The EBT paper counts an MCMC step as 10/3 AR training steps; this implementation's split layout computes the real
tokens once per batch and does less (docs/design.md §7).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models.config import ModelConfig


class FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formula of every op that has one (what FlopCounterMode counts, without its module tracker,
    which cannot follow autograd.grad with respect to a leaf input)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and (name := func._overloadpacket.__name__).endswith("_"):  # addmm_ computes as addmm
            formula = flop_registry.get(getattr(torch.ops.aten, name[:-1], None))
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def bytes_held_for_backward(objective: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """One training step: the bytes of the distinct storages, weights aside, that autograd holds for the outer backward
    when the forward (with its energy gradients) ends; then the step's backward runs."""
    weights = {p.untyped_storage().data_ptr() for p in objective.parameters()}
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))  # the graph holds what pack returns for as long as it needs it
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = objective(batch).loss
    held = {}
    for tensor in (ref() for ref in saved):
        if tensor is not None and tensor.untyped_storage().data_ptr() not in weights:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    loss.backward()
    return sum(held.values())


def step_flops_per_token(
    model_cfg: ModelConfig, mcmc_cfg: MCMCConfig, seq_len: int, num_mcmc_steps: int, repeats: int = 1
) -> float:
    """FLOPs per context token of one training step with exactly `num_mcmc_steps` landscapes of `repeats` steps each
    (meta device)."""
    mcmc = dataclasses.replace(
        mcmc_cfg, num_steps=num_mcmc_steps, max_num_steps=0, steps_per_landscape=repeats, max_steps_per_landscape=0
    )
    with torch.device("meta"):
        objective = build_objective(model_cfg.build(), mcmc.build())
        if model_cfg.modality == "text":
            batch = {"tokens": torch.zeros(1, seq_len + 1, dtype=torch.long)}
        else:
            batch = {"frames": torch.zeros(1, seq_len + 1, model_cfg.frame_dim)}
    with FlopCount() as count:
        objective(batch).loss.backward()
    return count.total / seq_len


def train_flops_per_token(model_cfg: ModelConfig, mcmc_cfg: MCMCConfig, seq_len: int) -> float:
    """Training FLOPs per context token; for an EBT the expectation over the step counts it trains with, and with a
    replay buffer per fresh token: each batch also refines its replayed share (sample_fraction) of sequences."""
    if model_cfg.kind != "ebt":
        return step_flops_per_token(model_cfg, mcmc_cfg, seq_len, 1)
    mc = mcmc_cfg
    counts = range(mc.num_steps, max(mc.num_steps, mc.max_num_steps) + 1)
    repeats = range(mc.steps_per_landscape, max(mc.steps_per_landscape, mc.max_steps_per_landscape) + 1)
    # linear in the steps of each landscape, so a shared repeat count gives the expectation of independent draws
    flops = statistics.fmean(step_flops_per_token(model_cfg, mc, seq_len, k, r) for k in counts for r in repeats)
    return flops * (1 + mc.replay.sample_fraction if mc.replay.size else 1)


# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts). Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, override: float) -> float | None:
    """The device's peak TFLOP/s for MFU: the recipe's value if set, the table for known GPUs, else None (CPU)."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def model_state_gb_per_rank(num_params: int, precision: str, zero_stage: int, dp_size: int) -> float:
    """Parameters + gradients + AdamW state per rank of `num_params` (a rank's tensor/pipeline share) under ZeRO
    stage `zero_stage` over `dp_size` data-parallel ranks (the ZeRO paper's accounting; activations come on top).
    bf16: 2 B params, 2 B grads, 12 B fp32 master + moments; fp32: 4 + 4 + 8. ZeRO-1 shards the optimizer state,
    ZeRO-2 also the gradients, ZeRO-3 (FSDP) also the parameters."""
    params, grads, optimizer = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    shard = [1.0, 1.0, 1.0]
    for index in range(zero_stage):  # 1: optimizer, 2: + gradients, 3: + parameters
        shard[2 - index] = 1 / dp_size
    return num_params * (params * shard[0] + grads * shard[1] + optimizer * shard[2]) / 2**30
