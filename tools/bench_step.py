"""EBT train step vs AR train step, same process, same sizes: does the EBT cost only what its FLOPs say?

Prints, for each EBT step conditioning asked for, ebt_step / ar_step (measured), the ratio of the FLOPs each step
computes (counted op by op, ebwm_scale.train.metrics) and their quotient (goal: <= 1.15 on CPU fp32), and the
process's peak resident memory after each model (cumulative: the AR runs first). `time_token` re-runs the context
stream once per MCMC step (it depends on the step), `none` and `additive` run it once per batch.

`--prediction-recompute full|selective` also times each EBT with parallel.prediction_recompute and prints, against
the EBT without it, the ratios of the step time, of the FLOPs one step computes (recomputes included) and of the bytes
that autograd holds for the outer backward when a step's forward ends (weights left out: the same either way).

    python tools/bench_step.py [--modality text|frames] [--dim 256] [--seq-len 128] [--conditioning none,time_token]
        [--prediction-recompute full|selective]
    # the official small NLP configuration (6 x 384, FFN 384, V = 50,277, S = 256, batch 8, 2 MCMC steps):
    python tools/bench_step.py --dim 384 --num-layers 6 --num-heads 6 --ffn-hidden-dim 384 --vocab-size 50277 \
        --seq-len 256 --batch-size 8 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize
from ebwm_scale.train.metrics import FlopCount, peak_memory_gb, train_flops_per_token
from ebwm_scale.train.optim import OptimConfig


def time_train_steps(objective, batch, num_warmup: int, num_steps: int) -> float:
    """Median seconds of forward + backward + optimizer step."""
    optimizer = OptimConfig().build(objective, alpha_lr_multiplier=1.0)
    times = []
    for i in range(num_warmup + num_steps):
        start = time.perf_counter()
        objective(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= num_warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_costs(objective, batch) -> tuple[int, int]:
    """One training step's bytes of the distinct storages, weights aside, that autograd holds for the outer backward
    when the forward (with its energy gradients) ends, leaving out what recomputes saved and dropped already; and its
    FLOPs by torch's per-op formulas (matmuls and attention), recomputes included."""
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
    with FlopCount() as flops:
        objective(batch).loss.backward()
    return sum(held.values()), flops.total


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
    args = parser.parse_args()

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
        batch = {"tokens": torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))}
    else:
        batch = {"frames": torch.randn(args.batch_size, args.seq_len + 1, args.frame_dim)}
    mcmc = MCMCConfig(num_steps=args.mcmc_steps, alpha_init=1.0, update_space=args.update_space)
    tokens = args.batch_size * args.seq_len
    recomputes = ["none"] + ([args.prediction_recompute] if args.prediction_recompute != "none" else [])
    runs = [("ar", args.ar_attn, "none", "none")]
    runs += [("ebt", args.ebt_attn, c, r) for c in args.conditioning.split(",") for r in recomputes]
    results, costs = {}, {}
    for kind, impl, conditioning, recompute in runs:
        cfg = ModelConfig(
            kind=kind,
            attn_impl=impl,
            ebt_impl=args.ebt_impl,
            step_conditioning=conditioning if kind == "ebt" else "none",
            num_step_embeddings=args.mcmc_steps,
            **shape,
        )
        parallel = ParallelConfig(prediction_recompute=recompute)
        objective = parallelize(build_objective(cfg.build(), mcmc.build()), parallel)
        seconds = time_train_steps(objective, batch, args.warmup, args.steps)
        flops = train_flops_per_token(cfg, mcmc, args.seq_len)
        name = "ar" if kind == "ar" else f"ebt[{conditioning}]"
        if recompute != "none":
            name += f"+recompute={recompute}"
        if kind == "ebt" and len(recomputes) > 1:
            costs[name] = step_costs(objective, batch)
        results[name] = (seconds, flops)
        print(
            f"{name:>16} ({impl}): {seconds * 1e3:8.1f} ms/step  {tokens / seconds:9,.0f} tok/s  "
            f"{flops / 1e6:8.2f} MFLOP/token  {flops * tokens / seconds / 1e9:6.2f} GFLOP/s  "
            f"process peak RSS so far {peak_memory_gb(torch.device('cpu')):5.2f} GiB"
        )
        del objective
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
                f"quotient = {time_ratio / flop_ratio:.3f}  (goal <= 1.15 on CPU fp32)"
            )


if __name__ == "__main__":
    main()
