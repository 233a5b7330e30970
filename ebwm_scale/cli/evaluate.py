"""`ebwm-eval`: the System-2 curve. Loss vs MCMC steps and vs best-of-N, in and out of distribution.

    ebwm-eval runs/ci_tiny/checkpoints --latest --steps trained,1,2,4,8,16 --best-of 1,4 --out eval/ci_tiny [--mlflow]
    ebwm-eval runs/ci_tiny/checkpoints --latest --steps-per-landscape 1,2,4 --alpha 0.5 --out eval/ci_tiny_landscapes
    ebwm-eval runs/ci_tiny_ar/checkpoints --latest --out eval/ci_tiny_ar       # an AR model: one flat line

On the first --batches validation batches (in distribution) and on as many out-of-distribution ones, every position
is predicted with each step schedule (--steps: a number of steps or the trained schedule; --steps-per-landscape) and
each best-of-N, under the thinking options (inference/think.py), from the same start noise. Reported per split: the
mean loss (cross-entropy or SmoothL1) with a 95 % interval over sequences, its change from the first point (paired
per sequence, with its interval: does thinking longer help?), the mean final energy, and the correlation between a
position's final energy and its loss (does the energy know when it is wrong?). Out of distribution: for the stdlib
docstring corpus, the standard library's code with docstrings removed (code vs prose); for synthetic video, clips with
twice the objects; for shards, --ood-shards (another prepared dataset, e.g. `tools/make_synthetic_videos.py --variant
ood` through `ebwm-prep video`). An AR model has nothing to refine: its loss is the same at every step, which is the
contrast. Writes system2.json and system2.png; --mlflow logs them to the checkpoint's MLflow run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ebwm_scale.cli.think_options import add_think_options, think_options
from ebwm_scale.core.mcmc import Steps, schedule_of
from ebwm_scale.core.objective import EBTObjective, split_batch
from ebwm_scale.data.sampler import fixed_batches
from ebwm_scale.errors import at_least, int_list, run_cli
from ebwm_scale.inference.think import ThinkConfig, think_about
from ebwm_scale.numerics import at_least_fp32

TRAINED = "trained"  # a --steps entry: the trained schedule


def steps_list(text: str) -> list[int | str]:
    """--steps: comma-separated step counts (>= 1) and "trained"."""
    count = at_least(1)
    return [part.strip() if part.strip() == TRAINED else count(part.strip()) for part in text.split(",")]


def position_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, S) loss of every predicted position: cross-entropy for tokens, SmoothL1 (beta 1) for frames."""
    pred = at_least_fp32(pred)
    if target.dtype == torch.long:
        return F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    return F.smooth_l1_loss(pred, target.to(pred.dtype), beta=1.0, reduction="none").mean(-1)


def evaluate_batch(
    objective, batch, num_steps: Steps, best_of: int, options: ThinkConfig | None = None
) -> dict[str, torch.Tensor]:
    """Per-position loss and final energy (EBT), or loss only (AR), of one batch, thinking for `num_steps` (a count,
    or each step's landscape) with `options` (plain gradient descent by default) and `best_of` chains."""
    ctx, target = split_batch(batch)
    if not isinstance(objective, EBTObjective):
        with torch.no_grad():
            return {"loss": position_losses(objective.predict(ctx), target)}
    with torch.no_grad():
        context = objective.model.encode_context(ctx)
    options = replace(options or ThinkConfig(), best_of=best_of)
    thought = think_about(objective, context, ctx.shape[1], num_steps, options)
    return {"loss": position_losses(thought.pred, target), "energy": thought.energy}


def schedules(steps: list[int | str], steps_per_landscape: list[int], options: ThinkConfig, mcmc) -> dict[str, Steps]:
    """The curve's points by label: "N" (N steps, step k on landscape k), "trained" (the trained schedule) and
    "Rx" (R steps per trained landscape, or on the final one under --final-landscape-only)."""
    points: dict[str, Steps] = {str(entry): mcmc.eval_schedule() if entry == TRAINED else int(entry) for entry in steps}
    for repeats in steps_per_landscape:
        points[f"{repeats}x"] = replace(options, steps_per_landscape=repeats).schedule(mcmc)
    return points


def describe(label: str, steps: int) -> str:
    if label == TRAINED:
        return f"trained schedule ({steps} steps)"
    if label.endswith("x"):
        return f"{label[:-1]} per landscape ({steps} steps)"
    return f"{steps} steps"


def curve(
    objective, batches: list[dict], points: dict[str, Steps], best_of: list[int], seed: int, options: ThinkConfig
) -> dict:
    """{best_of: {label: {steps, loss, loss_interval, change, change_interval, energy, energy_loss_correlation}}} over
    the batches. The intervals are 95 % normal intervals over sequences (each sequence's mean loss); `change` is the
    loss minus that of the first point, paired sequence by sequence, so that its interval is the one to read."""
    result: dict = {}
    for chains in best_of:
        first: torch.Tensor | None = None
        for label, num_steps in points.items():
            torch.manual_seed(seed)  # the same start noise for every setting
            parts = [evaluate_batch(objective, batch, num_steps, chains, options) for batch in batches]
            losses = torch.cat([p["loss"].flatten() for p in parts])
            per_sequence = torch.cat([p["loss"].flatten(1).mean(1) for p in parts]).double()
            first = per_sequence if first is None else first
            entry = {
                "steps": len(schedule_of(num_steps)),
                "loss": float(losses.mean()),
                "loss_interval": interval(per_sequence),
                "change": float((per_sequence - first).mean()),
                "change_interval": interval(per_sequence - first),
            }
            if "energy" in parts[0]:
                energies = torch.cat([p["energy"].flatten() for p in parts])
                entry["energy"] = float(energies.mean())
                entry["energy_loss_correlation"] = float(np.corrcoef(energies.numpy(), losses.numpy())[0, 1])
            result.setdefault(str(chains), {})[label] = entry
    return result


def interval(values: torch.Tensor) -> list[float]:
    """The 95 % normal interval of the mean of `values`."""
    half = 1.96 * float(values.std()) / max(1, values.numel()) ** 0.5 if values.numel() > 1 else 0.0
    return [float(values.mean()) - half, float(values.mean()) + half]


def _half(bounds: list[float]) -> float:
    return (bounds[1] - bounds[0]) / 2


def ood_dataset(cfg, ood_shards: str, ood_split: str = "val"):
    """The out-of-distribution split for the model's data, or None with the reason."""
    if ood_shards:
        from ebwm_scale.data.loader import ShardSamples, ShardSource

        return ShardSamples(ShardSource.open(ood_shards, ood_split)), f"shards {ood_shards} ({ood_split} split)"
    if cfg.data.source == "stdlib_docs":
        from ebwm_scale.data.text import stdlib_code_windows

        return stdlib_code_windows(cfg.data.seq_len), "stdlib code without docstrings"
    if cfg.data.source == "synthetic_video":
        from ebwm_scale.data.video import synthetic_video_splits

        v = cfg.data.video
        twice = 2 * v.max_objects
        _, val = synthetic_video_splits(64, 64, cfg.data.seq_len, v.frame_size, v.patch_size, twice, cfg.data.seed + 1)
        return val, f"synthetic video, up to {twice} objects"
    return None, "no --ood-shards given"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for split, style in (("in_distribution", "-"), ("out_of_distribution", "--")):
        for chains, by_label in results.get(split, {}).items():
            for family, marker, chosen in (
                ("", "o", str.isdigit),
                (", steps per landscape", "s", lambda name: name.endswith("x")),
                (", trained schedule", "*", lambda name: name == TRAINED),
            ):
                entries = sorted((e for name, e in by_label.items() if chosen(name)), key=lambda e: e["steps"])
                if entries:
                    label = f"{split.replace('_', ' ')}, best of {chains}{family}"
                    x, y = [e["steps"] for e in entries], [e["loss"] for e in entries]
                    axis.plot(x, y, style, marker=marker, label=label)
    axis.set(xscale="log", xlabel="MCMC steps per prediction", ylabel="loss", title=title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    from ebwm_scale.inference.export import load_checkpoint, load_model
    from ebwm_scale.train.checkpoint import Checkpointer, CheckpointError

    parser = argparse.ArgumentParser(prog="ebwm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export directory, a checkpoint, or with --latest a checkpoint_dir")
    parser.add_argument("--latest", action="store_true")
    parser.add_argument(
        "--steps",
        type=steps_list,
        default=[TRAINED, 1, 2, 4, 8, 16],
        help="step counts, step k on landscape k (later ones on the last trained), and/or 'trained': the trained "
        "schedule, each landscape its most steps (e.g. trained,1,2,4,8,16)",
    )
    parser.add_argument(
        "--steps-per-landscape",
        type=int_list(1),
        default=[],
        help="more points: this many steps on each trained landscape, e.g. 1,2,4 (official --infer_ebt_num_steps)",
    )
    parser.add_argument(
        "--best-of",
        type=int_list(1),
        default=[1, 4],
        help="chains per prediction, e.g. 1,4 (official --infer_generated_samples)",
    )
    parser.add_argument("--batches", type=at_least(1), default=4, help="validation batches per split")
    parser.add_argument("--batch-size", type=at_least(0), default=0, help="0: the recipe's micro batch")
    parser.add_argument("--ood-shards", default="", help="a prepared dataset to use as the OOD split")
    parser.add_argument(
        "--ood-split", default="val", choices=["val", "train"], help="which split of --ood-shards (no model saw either)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mlflow", action="store_true", help="log to the checkpoint's MLflow run")
    add_think_options(parser)
    args = parser.parse_args(argv)
    options = think_options(parser, args)
    url = args.model
    if args.latest:
        url = Checkpointer(url, keep_last=1).latest() or ""
        if not url:
            raise CheckpointError(f"no complete checkpoint in {args.model}")
    cfg, objective = load_model(url)
    objective.eval()
    points = schedules(args.steps, args.steps_per_landscape, options, cfg.mcmc)
    best_of = args.best_of if isinstance(objective, EBTObjective) else [1]
    if not isinstance(objective, EBTObjective):
        # an AR model's loss does not depend on them: the fewest and the most steps draw the flat line
        ordered = sorted(points, key=lambda label: len(schedule_of(points[label])))
        points = {label: points[label] for label in (ordered[0], ordered[-1])}
    batch_size = args.batch_size or cfg.data.micro_batch_size
    _, val, _ = cfg.data.build_datasets(cfg.model)
    ood, ood_name = ood_dataset(cfg, args.ood_shards, args.ood_split)
    results: dict = {"model": url, "kind": cfg.model.kind, "ood": ood_name}
    for split, dataset in (("in_distribution", val), ("out_of_distribution", ood)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise SystemExit(f"the {split.replace('_', ' ')} set ({ood_name if dataset is ood else 'val'}) is empty")
        batches = list(fixed_batches(dataset, batch_size, args.batches, 0, 1))
        results[split] = curve(objective, batches, points, best_of, args.seed, options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "system2.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "system2.png", f"{cfg.train.run_name} ({cfg.model.kind.upper()})")
    for split in ("in_distribution", "out_of_distribution"):
        for chains, by_steps in results.get(split, {}).items():
            line = ", ".join(
                f"{describe(s, v['steps'])} {v['loss']:.4f} ({v['change']:+.4f} ± {_half(v['change_interval']):.4f})"
                for s, v in by_steps.items()
            )
            last = by_steps[list(points)[-1]]
            corr = last.get("energy_loss_correlation")
            shown = f"; energy-loss correlation {corr:.2f}" if corr is not None else ""
            print(f"{split.replace('_', ' ')}, best of {chains}: {line}{shown}")
    print(f"wrote {out / 'system2.json'} and {out / 'system2.png'} (OOD: {ood_name})")
    if args.mlflow:
        _, _, trainer_state = load_checkpoint(url)
        run_id = trainer_state["callbacks"].get("MLflowCallback", {}).get("run_id")
        if not run_id:
            raise SystemExit(f"{url} records no MLflow run")
        import mlflow

        mlflow.MlflowClient(cfg.tracking.uri).log_artifacts(run_id, str(out), artifact_path="system2")
        print(f"logged to MLflow run {run_id} (artifacts/system2)")


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
