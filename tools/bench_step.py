"""EBT train step vs AR train step, same process, same sizes: does the EBT cost only what its FLOPs say?

Prints, for each EBT step conditioning asked for, ebt_step / ar_step (measured), the ratio of the FLOPs each step
computes (counted op by op, ebwm_scale.train.metrics) and their quotient (goal: <= 1.15 on CPU fp32). Per model: the
peak resident memory while it trains (the high-water mark reset before it is built), page faults and kernel time
per step (getrusage over the timed steps: freshly mapped memory costs a fault per 4 KiB page), and with
--live-peak the peak of live memory, measured in a child process whose C allocator returns every freed block above
64 KiB at once (MALLOC_MMAP_THRESHOLD_), so that its resident set follows the live tensors (and runs slower).
`time_token` re-runs the context stream once per MCMC step (it depends on the step), `none` and `additive` run it
once per batch. On CUDA (--device cuda, with --precision bf16 for autocast) memory is the allocator's peak and page
faults are not counted.

`--prediction-recompute full|selective` also times each EBT with parallel.prediction_recompute and prints, against
the EBT without it, the ratios of the step time, of the FLOPs one step computes (recomputes included) and of the bytes
that autograd holds for the outer backward when a step's forward ends (weights left out: the same either way).

    python tools/bench_step.py [--modality text|frames] [--dim 256] [--seq-len 128] [--conditioning none,time_token]
        [--prediction-recompute full|selective]
    # the official small NLP configuration (6 x 384, FFN 384, V = 50,277, S = 256, batch 8, 2 MCMC steps):
    python tools/bench_step.py --official-small --steps 3 --warmup 1 [--live-peak]
    python tools/bench_step.py --official-small --device cuda --precision bf16 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize
from ebwm_scale.train.metrics import FlopCount, bytes_held_for_backward, train_flops_per_token
from ebwm_scale.train.optim import OptimConfig

LIVE_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (the high-water mark) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_gib(device: torch.device) -> float:
    """Since reset_peak: the CUDA allocator's peak, or the resident set's high-water mark."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else rss_gib("VmHWM")


def time_train_steps(objective, batch, num_warmup: int, num_steps: int, autocast) -> tuple[float, float, float]:
    """Median seconds of forward + backward + optimizer step; minor page faults and kernel seconds per timed step."""
    optimizer = OptimConfig().build(objective, alpha_lr_multiplier=1.0)
    device = next(objective.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    for i in range(num_warmup + num_steps):
        if i == num_warmup:
            before = resource.getrusage(resource.RUSAGE_SELF)
        sync()
        start = time.perf_counter()
        with autocast:
            loss = objective(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= num_warmup:
            times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / num_steps
    return statistics.median(times), faults, (after.ru_stime - before.ru_stime) / num_steps


def live_peak_gib(run_name: str) -> float:
    """This script's run `run_name` again (1 warm-up, 1 step) in a child whose RSS follows its live tensors."""
    argv = [a for a in sys.argv[1:] if a != "--live-peak"]
    command = [sys.executable, __file__, *argv, "--only", run_name, "--warmup", "1", "--steps", "1"]
    child = subprocess.run(command, env={**os.environ, **LIVE_PEAK_ENV}, capture_output=True, text=True, check=True)
    peaks = [line.split()[-1] for line in child.stdout.splitlines() if line.startswith("peak_rss_gib ")]
    return float(peaks[-1])


def step_costs(objective, batch) -> tuple[int, int]:
    """One training step's bytes that autograd holds for the outer backward when the forward ends (weights aside;
    what recomputes saved and dropped already left out), and its FLOPs by torch's per-op formulas (matmuls and
    attention), recomputes included."""
    held = bytes_held_for_backward(objective, batch)
    with FlopCount() as flops:
        objective(batch).loss.backward()
    return held, flops.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["text", "frames"], default="text")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--frame-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ffn-hidden-dim", type=int, default=0, help="0: Llama's 8/3 x dim")
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--update-space", default="probs", help="text EBT update rule: probs | logits")
    parser.add_argument("--conditioning", default="none,time_token", help="EBT step conditionings to time")
    parser.add_argument("--ebt-impl", default="split", help="EBT layout: split (default) | masked (literal 2S)")
    parser.add_argument("--ebt-attn", default="sdpa", help="EBT context-stream kernel: math | sdpa | sdpa_fused")
    parser.add_argument("--ar-attn", default="sdpa_fused", help="the AR baseline's fastest: sdpa_fused")
    parser.add_argument("--prediction-recompute", choices=["none", "full", "selective"], default="none")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--official-small", action="store_true", help="6 x 384, FFN 384, V 50,277, S 256, B 8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--live-peak", action="store_true", help="CPU: also measure each model's live-memory peak")
    parser.add_argument("--only", default="", help="time this run only (ar, ebt[none], ...): --live-peak's child")
    args = parser.parse_args()
    if args.official_small:
        official = dict(dim=384, num_layers=6, num_heads=6, ffn_hidden_dim=384, vocab_size=50277, seq_len=256)
        for key, value in official.items():
            setattr(args, key, value)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    torch.manual_seed(0)
    shape = dict(
        modality=args.modality,
        dim=args.dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        frame_dim=args.frame_dim,
        ffn_hidden_dim=args.ffn_hidden_dim,
    )
    if args.modality == "text":
        batch = {"tokens": torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)}
    else:
        batch = {"frames": torch.randn(args.batch_size, args.seq_len + 1, args.frame_dim, device=device)}
    mcmc = MCMCConfig(num_steps=args.mcmc_steps, alpha_init=1.0, update_space=args.update_space)
    tokens = args.batch_size * args.seq_len
    recomputes = ["none"] + ([args.prediction_recompute] if args.prediction_recompute != "none" else [])
    runs = [("ar", args.ar_attn, "none", "none")]
    runs += [("ebt", args.ebt_attn, c, r) for c in args.conditioning.split(",") for r in recomputes]
    results, costs = {}, {}
    for kind, impl, conditioning, recompute in runs:
        name = "ar" if kind == "ar" else f"ebt[{conditioning}]"
        if recompute != "none":
            name += f"+recompute={recompute}"
        if args.only and name != args.only:
            continue
        reset_peak(device)
        cfg = ModelConfig(
            kind=kind,
            attn_impl=impl,
            ebt_impl=args.ebt_impl,
            step_conditioning=conditioning if kind == "ebt" else "none",
            num_step_embeddings=args.mcmc_steps,
            **shape,
        )
        parallel = ParallelConfig(prediction_recompute=recompute)
        objective = parallelize(build_objective(cfg.build(), mcmc.build()).to(device), parallel)
        seconds, faults, kernel_seconds = time_train_steps(objective, batch, args.warmup, args.steps, autocast)
        flops = train_flops_per_token(cfg, mcmc, args.seq_len)
        if kind == "ebt" and len(recomputes) > 1:
            costs[name] = step_costs(objective, batch)
        results[name] = (seconds, flops)
        peak = peak_gib(device)
        if device.type == "cuda":
            memory = f"peak allocated {peak:5.2f} GiB"
        else:
            live = f"  live peak {live_peak_gib(name):5.2f} GiB" if args.live_peak else ""
            memory = (
                f"peak RSS {peak:5.2f} GiB{live}  "
                f"{faults / 1e3:7.1f} k page faults/step  {kernel_seconds:5.2f} s kernel/step"
            )
        print(
            f"{name:>16} ({impl}): {seconds * 1e3:8.1f} ms/step  {tokens / seconds:9,.0f} tok/s  "
            f"{flops / 1e6:8.2f} MFLOP/token  {flops * tokens / seconds / 1e9:6.2f} GFLOP/s  {memory}"
        )
        if args.only:  # read by live_peak_gib
            print(f"peak_rss_gib {peak}")
        del objective
    if "ar" not in results:
        return
    ar_seconds, ar_flops = results["ar"]
    for name, (seconds, flops) in results.items():
        if "+recompute" in name:  # against the plain EBT: the FLOPs counted above leave its recomputes out
            plain = name.split("+")[0]
            (held, step_flops), (plain_held, plain_flops) = costs[name], costs[plain]
            print(
                f"{name}: step time x{seconds / results[plain][0]:.2f}, FLOPs x{step_flops / plain_flops:.2f}, "
                f"held for the outer backward {held / 2**20:.1f} / {plain_held / 2**20:.1f} MiB = "
                f"x{held / plain_held:.2f}"
            )
        elif name != "ar":
            time_ratio, flop_ratio = seconds / ar_seconds, flops / ar_flops
            print(
                f"{name}: ebt_step / ar_step = {time_ratio:.3f}, flop ratio (counted) = {flop_ratio:.3f}, "
                f"quotient = {time_ratio / flop_ratio:.3f}  (goal <= 1.15)"
            )


if __name__ == "__main__":
    main()
