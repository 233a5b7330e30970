"""Throughput of a recipe on this machine: the EBT as written and its AR baseline (same recipe, model.kind=ar),
trained for a few steps each in this process. Reports tokens/s, TFLOP/s and MFU by the FLOPs each step computes
(ebwm_scale.train.metrics: counted op by op, every MCMC step included), peak memory, and EBT / AR ratios.

Goals on an H100-class GPU in bf16 (issue 12): MFU >= 35 % for the EBT, >= 40 % for AR.

    python tools/bench_gpu.py [recipes/gpu_single.yaml] [--steps 60] [--warmup 10] [--json out.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ebwm_scale.config import load_config
from ebwm_scale.parallel.dist import init_distributed, shutdown_distributed
from ebwm_scale.pretrain import build_trainer
from ebwm_scale.train.callbacks import Callback

REPO = Path(__file__).resolve().parent.parent


class StepMetrics(Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_step_end(self, trainer, step, metrics):
        self.steps.append(dict(metrics))


def run(recipe: Path, overrides: list[str], steps: int, warmup: int, output_dir: str, dist) -> dict[str, float]:
    settings = [
        f"train.max_steps={warmup + steps}",
        "train.log_interval_steps=1",  # throughput is measured on logged steps
        "train.eval_interval_steps=0",
        "train.eval_batches=1",
        "train.progress_bar=false",
        f"train.output_dir={output_dir}",
        *overrides,
    ]
    cfg = load_config(recipe, settings)
    recorder = StepMetrics()
    trainer = build_trainer(cfg, dist, [recorder])
    trainer.fit()
    measured = [m for m in recorder.steps[warmup:] if "tflops" in m]
    if not measured:
        raise SystemExit(f"no logged step after {warmup} warm-up steps; raise --steps")
    unit = trainer.unit
    result = {
        "kind": cfg.model.kind,
        "params": trainer.num_params,
        f"{unit}_per_s": statistics.median(m[f"{unit}_per_s"] for m in measured),
        "tflops": statistics.median(m["tflops"] for m in measured),
        "peak_mem_gb": max(m["peak_mem_gb"] for m in measured),
        "loss_last": measured[-1]["loss"],
    }
    if all("mfu" in m for m in measured):
        result["mfu"] = statistics.median(m["mfu"] for m in measured)
    return result


def describe(result: dict[str, float]) -> str:
    unit_rate = next(key for key in result if key.endswith("_per_s"))
    mfu = f"{100 * result['mfu']:.1f} % MFU" if "mfu" in result else "MFU n/a (unknown peak: train.peak_tflops)"
    return (
        f"{result['kind'].upper()} ({result['params']:,} params): {result[unit_rate]:,.0f} {unit_rate[:-6]}/s, "
        f"{result['tflops']:.2f} TFLOP/s, {mfu}, peak memory {result['peak_mem_gb']:.2f} GB, "
        f"loss {result['loss_last']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "gpu_single.yaml"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value, applied to both runs")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ar-overrides", default="model.kind=ar", help="comma-separated, for the AR baseline")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg = load_config(Path(args.recipe), args.overrides)
    dist = init_distributed(cfg.parallel, cfg.train.device)
    device = dist.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.recipe} on {name}, torch {torch.__version__}; {args.steps} measured steps after {args.warmup}")
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for label, extra in (("ebt", []), ("ar", args.ar_overrides.split(","))):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            overrides = [*args.overrides, *extra]
            results[label] = run(Path(args.recipe), overrides, args.steps, args.warmup, output_dir, dist)
            print(describe(results[label]))
    ebt, ar = results["ebt"], results["ar"]
    print(f"EBT / AR: {ebt['tflops'] / ar['tflops']:.2f}x TFLOP/s (counted FLOPs), ", end="")
    rate = next(key for key in ebt if key.endswith("_per_s"))
    print(f"{ebt[rate] / ar[rate]:.3f}x {rate[:-6]}/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "recipe": args.recipe, **results}, indent=1) + "\n")
    shutdown_distributed()


if __name__ == "__main__":
    main()
