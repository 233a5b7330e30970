"""The training loop's configuration (the `train` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ebwm_scale.schema import Choice, non_negative, positive


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 300  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    log_interval_steps: int = 10  # a log line (and tracked metrics) every this many steps
    eval_interval_steps: int = 100  # 0: evaluate only at the end
    eval_batches: int = 8  # validation batches per evaluation (the same ones every time)
    seed: int = 0  # initial weights and MCMC noise
    device: Device = Device.auto  # auto (cuda if present) | cuda | cpu
    precision: Precision = Precision.fp32  # bf16: autocast for the matmuls; the MCMC state and losses stay fp32
    output_dir: str = "runs"  # the run writes <output_dir>/<run_name>/{config.yaml,summary.json,metrics.jsonl}
    run_name: str = ""  # default: the recipe's file name
    progress_bar: bool = True  # a live bar on a terminal (log lines either way)
    log_all_ranks: bool = False  # every rank logs its lines (prefixed with its rank); default: rank 0 only
    checkpoint_dir: str = ""  # any fsspec URL; default <output_dir>/<run_name>/checkpoints
    checkpoint_interval_steps: int = 0  # 0: only at the end and when stopped by a signal
    keep_last_checkpoints: int = 3  # older periodic checkpoints are removed
    checkpoint_at_steps: list[int] = field(default_factory=list)  # also save at these steps, and never prune them
    checkpoint_async: bool = False  # write in the background (state copied at the step); training goes on meanwhile
    resume: str = "none"  # none | auto (newest complete checkpoint in checkpoint_dir, if any) | a checkpoint URL
    # Recipe keys a resumed run may change although exact resume then breaks (global_batch for the batch over all
    # ranks); any other change of what a step computes (model, MCMC, data, optimizer, seed) is refused.
    resume_allow_changes: list[str] = field(default_factory=list)
    # A checkpoint of another run to start from when this run has none of its own (resume none or auto): a decay
    # branch of a longer warmup-stable-decay run (optim.schedule=wsd; ebwm-ladder sets it).
    branch_from: str = ""
    init_from: str = ""  # an export (tools/export.py) whose weights start a new run, under any parallel layout
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    peak_tflops: float = 0.0  # device peak for MFU; 0: known GPUs from a table, none on CPU

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "train", "max_steps", "grad_accum_steps", "log_interval_steps", "eval_batches")
        problems += positive(self, "train", "keep_last_checkpoints", "max_bad_steps")
        problems += non_negative(self, "train", "eval_interval_steps", "checkpoint_interval_steps", "peak_tflops")
        if not self.resume:
            problems.append("train.resume='' must be none, auto or a checkpoint URL")
        return problems
