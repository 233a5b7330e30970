"""What torch.compile buys where the EBT allows it (parallel.compile, parallelize.apply_compile): train-step time of
the AR baseline (every block compiled) and of the EBT (real-token stream compiled, prediction stream eager), each
against its eager self; and the AdamW step as foreach, fused and compiled.

    python tools/bench_compile.py [--dim 256] [--num-layers 4] [--seq-len 128] [--batch-size 8] [--mcmc-steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_step import time_train_steps  # tools/ is this script's directory

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize


def build(kind: str, args, compile: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, dim=args.dim, num_layers=args.num_layers, num_heads=4)
    objective = build_objective(cfg.build(), MCMCConfig(num_steps=args.mcmc_steps, alpha_init=20.0).build())
    return parallelize(objective, ParallelConfig(compile=compile))


def time_optimizer_steps(params: list[torch.Tensor], variant: str, repeats: int) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=variant == "foreach", fused=variant == "fused")
    step = torch.compile(optimizer.step) if variant == "compiled" else optimizer.step
    for p in params:
        p.grad = torch.randn_like(p)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="the first compiled step compiles")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    batch = {"tokens": torch.randint(0, 256, (args.batch_size, args.seq_len + 1))}
    print(f"{args.num_layers} x {args.dim}, B {args.batch_size} x S {args.seq_len}, {args.mcmc_steps} MCMC steps, CPU")
    for kind in ("ar", "ebt"):
        eager = time_train_steps(build(kind, args, False), batch, args.warmup, args.steps)
        compiled = time_train_steps(build(kind, args, True), batch, args.warmup, args.steps)
        print(
            f"{kind}: eager {eager * 1e3:.0f} ms, compiled {compiled * 1e3:.0f} ms, eager / compiled = "
            f"{eager / compiled:.2f}x"
        )
    params = [p.detach().clone().requires_grad_() for p in build("ebt", args, False).parameters()]
    times = {variant: time_optimizer_steps(params, variant, 20) for variant in ("foreach", "fused", "compiled")}
    print(
        "AdamW step: "
        + ", ".join(f"{variant} {seconds * 1e3:.2f} ms" for variant, seconds in times.items())
        + f"; foreach / fused = {times['foreach'] / times['fused']:.2f}x, "
        f"foreach / compiled = {times['foreach'] / times['compiled']:.2f}x"
    )


if __name__ == "__main__":
    main()
