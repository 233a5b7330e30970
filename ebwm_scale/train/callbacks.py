"""Callbacks: everything optional in a run (console output, tracking; later checkpoints, NaN guard, profiling).

A callback gates itself on rank (the console through the logger's level); the trainer calls every callback on
every rank.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ebwm_scale.logs import log

if TYPE_CHECKING:
    from ebwm_scale.train.trainer import Trainer


class Callback:
    """Hooks are called on every rank, in list order. State returned by state_dict() is checkpointed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint_saved(self, trainer: Trainer, step: int, url: str) -> None:
        pass

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any], error: BaseException | None) -> None:
        pass


def format_log_line(step: int, max_steps: int, m: dict[str, float], unit: str) -> str:
    """One compact line: step, loss (per MCMC step), energy first -> last, alpha, grad norm, lr, throughput."""
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}", f"loss {m['loss']:.4f}"]
    step_losses = [m[k] for k in sorted(m) if k.startswith("loss_step")]
    if step_losses:
        parts.append("per-step [" + " ".join(f"{v:.3f}" for v in step_losses) + "]")
    if "energy_first" in m:
        parts.append(f"E {m['energy_first']:+.3f}->{m['energy_last']:+.3f}")
    if "alpha" in m:
        parts.append(f"alpha {m['alpha']:.4g}")
    parts += [f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}", f"{m[unit + '_per_s']:,.0f} {unit}/s"]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']:.0f}")
    return " | ".join(parts)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The run summary as a few sentences (summary.json has the same fields for machines)."""
    scale, unit = summary["scale"], summary["scale"]["unit"]
    resumed = f", resumed from {summary['resumed_from']}" if summary["resumed_from"] else ""
    return [
        f"run {summary['run']} {summary['status']}: {summary['steps']} steps on {summary['world_size']} rank(s), "
        f"{summary[unit]:,} {unit} in {summary['wall_time_s']:.1f} s ({summary[unit + '_per_s']:,.0f} {unit}/s), "
        f"{summary['skipped_steps']} skipped steps{resumed}",
        f"loss: train {summary['train_loss']:.4f}, eval {summary['eval_loss']:.4f}",
        f"scale: {scale['kind'].upper()}, {scale['params']:,} parameters, {scale['data']:,} {unit}, "
        f"{scale['flops']:.3g} FLOP",
        f"output: {summary['output_dir']} (summary.json, metrics.jsonl, config.yaml)",
    ]


class ConsoleCallback(Callback):
    """Log lines (start, every `log_interval_steps`, evals, checkpoints, the summary) through the `ebwm_scale` logger,
    which shows rank 0 unless train.log_all_ranks; a live progress bar on rank 0's terminal."""

    def __init__(self, is_rank0: bool, log_interval_steps: int, progress_bar: bool):
        self.log_interval_steps = log_interval_steps
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(highlight=False),
            disable=not (progress_bar and is_rank0),
        )
        self.task: TaskID | None = None  # added when training starts

    def on_train_start(self, trainer: Trainer) -> None:
        for line in trainer.describe():
            log.info(line)
        if trainer.step:
            log.info(f"resumed at step {trainer.step} from {trainer.resumed_from}")
        self.task = self.progress.add_task("train", total=trainer.max_steps, completed=trainer.step)
        self.progress.start()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        assert self.task is not None  # the trainer calls on_train_start first
        self.progress.update(self.task, completed=step)
        if step % self.log_interval_steps == 0 or step == trainer.max_steps:
            log.info(format_log_line(step, trainer.max_steps, metrics, trainer.unit))

    def on_checkpoint_saved(self, trainer: Trainer, step: int, url: str) -> None:
        log.info(f"checkpoint @ step {step}: {url}")

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        log.info(f"eval @ step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any], error: BaseException | None) -> None:
        self.progress.stop()
        if trainer.stop_requested and error is None:
            log.info(
                f"{trainer.stop_requested}: stopped after step {trainer.step} with a checkpoint in "
                f"{trainer.checkpointer.url}; rerun with train.resume=auto to continue"
            )
        for line in summary_lines(summary):
            log.info(line)


class MetricsFileCallback(Callback):
    """Appends every step's and eval's metrics as JSON lines to <run dir>/metrics.jsonl (rank 0); a resumed run
    keeps appending, so the file holds the whole history, with re-run steps after a crash repeated."""

    def __init__(self, is_rank0: bool):
        self.is_rank0 = is_rank0

    def _append(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.is_rank0:
            with open(trainer.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self._append(trainer, {"step": step, "split": "train", **metrics})

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self._append(trainer, {"step": step, "split": "eval", **metrics})
