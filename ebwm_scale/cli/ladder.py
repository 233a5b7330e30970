"""Scaling ladders: one base recipe x model sizes x data budgets x model kinds, run as ordinary training runs.

    ebwm-ladder recipes/ladders/nlp_tiny_cpu.yaml --dry-run        # the grid, what is done, what is left
    ebwm-ladder recipes/ladders/nlp_tiny_cpu.yaml                  # run what is left, one after another
    ebwm-ladder recipes/ladders/nlp_tiny_cpu.yaml --only '*-s1-*'  # a subset (shell-style patterns on run names)
    ebwm-ladder recipes/ladders/nlp_paper.yaml --emit-slurm ladder.sbatch [--sbatch-option=--gres=gpu:8 ...]
    ebwm-ladder recipes/ladders/nlp_paper.yaml --ray [--cpus-per-run 2 --gpus-per-run 1]

Every kind trains on the same data in the same order (the base recipe's data and seed) with the same tokenizer.
A kind is `ebt`, `ar`, or a name of your own whose kind_overrides set model.kind (e.g. `ebt_logits:
[model.kind=ebt, mcmc.update_space=logits]`): the fit treats each name as its own model family.
Run names are stable: <ladder>-<kind>-<size>-<budget>. A run whose summary.json says it finished all its steps is
skipped, and every run resumes from its newest checkpoint (train.resume=auto), so a killed ladder picks up where it
stopped. All runs log to one MLflow experiment with the tags ladder, kind, size, params, tokens and flops, which
`ebwm-fit` reads.

schedule: wsd trains each kind and size once, to its largest budget, at a constant lr after warmup, keeping a
checkpoint where each smaller budget's decay starts; each smaller budget is a branch that resumes from it and decays
(optim.schedule=wsd). Warmup is then warmup_fraction of the smallest budget's steps, shared by trunk and branches.

Ranks: each run has data_parallel_ranks x the recipe's tensor x pipeline parallel ranks (its world size), and its
budget is divided by that global batch. Runs are launched with exactly that many ranks: one process, else torchrun
on this machine (also inside a Ray task that holds all the run's CPUs and GPUs on one node), or srun inside a SLURM
array task that requested them (--ntasks). Every run checks at start that its world size is the planned one
(parallel.expected_world_size), so no run trains a fraction of its labelled budget.

Learning rate per size: lr = lr_base * (lr_ref_dim / dim) ** lr_width_power (default power 1: Adam's lr falling as
1 / width, the muP rule for hidden matrices, applied to every parameter for simplicity); warmup is
warmup_fraction of each run's steps. Steps = budget / (micro batch x seq_len x grad accumulation x data-parallel
ranks), rounded up.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebwm_scale.config import ConfigError, PretrainConfig, load_config, load_structured
from ebwm_scale.errors import run_cli
from ebwm_scale.models.config import ModelKind
from ebwm_scale.train.checkpoint import checkpoint_name
from ebwm_scale.train.optim import OptimConfig, Schedule, wsd_decay_start

ENTRY_POINT = Path(__file__).resolve().parents[1] / "pretrain.py"


@dataclass(kw_only=True)
class LadderConfig:
    name: str
    base: str  # the recipe every run starts from, relative to the ladder file
    kinds: list[str] = field(default_factory=lambda: ["ebt", "ar"])  # ebt, ar, or names defined in kind_overrides
    sizes: dict[str, Any] = field(default_factory=dict)  # size name -> {model key: value}
    budgets: list[int] = field(default_factory=list)  # tokens (text) or frames (video) each run trains on
    lr_base: float = 1e-3
    lr_ref_dim: int = 128
    lr_width_power: float = 1.0
    warmup_fraction: float = 0.1
    # cosine: every budget a run of its own. wsd: per kind and size one run to the largest budget at a constant lr,
    # and every smaller budget a branch of it that decays the lr over its last decay_fraction of steps (see below).
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2
    data_parallel_ranks: int = 1  # data-parallel replicas per run: budgets are divided into steps by the global batch
    cpus_per_rank: int = 1  # what a Ray task or SLURM task of a run asks for, per rank
    gpus_per_rank: int = 0
    overrides: list[str] = field(default_factory=list)  # recipe overrides for every run
    kind_overrides: dict[str, Any] = field(default_factory=dict)  # kind -> [overrides] for that kind's runs
    output_dir: str = "runs/ladders"  # runs go to <output_dir>/<name>/<run>
    experiment: str = ""  # MLflow experiment; default ladder-<name>


@dataclass(frozen=True)
class LadderRun:
    name: str
    kind: str
    size: str
    budget: int
    overrides: tuple[str, ...]
    output_dir: Path
    max_steps: int
    trunk: str = ""  # wsd: the run this one branches from (it must pass the branch step first)
    branch_point: Path | None = None  # wsd: the trunk's checkpoint this run starts from
    ranks: int = 1  # its world size: data_parallel_ranks x tensor x pipeline parallel

    def is_finished(self) -> bool:
        summary = self.output_dir / self.name / "summary.json"
        try:
            done = json.loads(summary.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return done.get("status") == "finished" and done.get("steps") == self.max_steps


def budget_label(budget: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if budget >= scale:
            return f"{budget / scale:g}{unit}"
    return str(budget)


SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def load_ladder(path: str | Path) -> tuple[LadderConfig, Path]:
    path = Path(path)
    ladder: LadderConfig = load_structured(LadderConfig, path, "ladder")
    base = (path.parent / ladder.base).resolve()
    unknown = [k for k in ladder.kinds if model_kind(ladder, k) not in ModelKind.values()]
    badly_named = [
        f"{what}={value!r}"
        for what, values in (("name", [ladder.name]), ("kinds", ladder.kinds), ("sizes", list(ladder.sizes)))
        for value in values
        if not SAFE_NAME.fullmatch(str(value))
    ]
    problems = [
        badly_named and f"{badly_named[0]}: names go into run names, paths and job scripts: use [A-Za-z0-9_.-] only",
        not ladder.sizes and "sizes is empty",
        not ladder.budgets and "budgets is empty",
        any(b <= 0 for b in ladder.budgets) and f"budgets={ladder.budgets} must be > 0",
        ladder.data_parallel_ranks < 1 and f"data_parallel_ranks={ladder.data_parallel_ranks} must be >= 1",
        ladder.cpus_per_rank < 1 and f"cpus_per_rank={ladder.cpus_per_rank} must be >= 1",
        ladder.gpus_per_rank < 0 and f"gpus_per_rank={ladder.gpus_per_rank} must be >= 0",
        *(f"kinds: {k!r} is neither ebt nor ar, and kind_overrides.{k} sets no model.kind=ebt|ar" for k in unknown),
        len(set(ladder.kinds)) != len(ladder.kinds) and f"kinds={ladder.kinds} has repeats",
        not 0 <= ladder.warmup_fraction < 1 and f"warmup_fraction={ladder.warmup_fraction} must lie in [0, 1)",
        not 0 < ladder.decay_fraction <= 1 and f"decay_fraction={ladder.decay_fraction} must lie in (0, 1]",
        len(set(ladder.budgets)) != len(ladder.budgets) and f"budgets={ladder.budgets} has repeats",
        any(not isinstance(v, dict) for v in ladder.sizes.values()) and "sizes: each size is {model key: value}",
        any(not isinstance(v, list) for v in ladder.kind_overrides.values())
        and "kind_overrides: each kind is a list of overrides",
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise ConfigError(f"{problem} ({path})")
    return ladder, base


def model_kind(ladder: LadderConfig, kind: str) -> str:
    """The model.kind a ladder kind trains: its own name, unless its kind_overrides set model.kind."""
    chosen = kind
    for override in ladder.kind_overrides.get(kind, []):
        key, _, value = str(override).partition("=")
        if key.strip() == "model.kind":
            chosen = value.strip()
    return chosen


def expand(ladder: LadderConfig, base: Path) -> list[LadderRun]:
    """The concrete runs, each checked like a recipe (a bad size or override fails here, before anything runs).
    Under schedule wsd the largest budget of each kind and size comes first: the others branch from it."""
    plain = load_config(base, ladder.overrides)
    runs = []
    for kind in ladder.kinds:
        for size, model in ladder.sizes.items():
            common = [*ladder.overrides, *ladder.kind_overrides.get(kind, []), f"model.kind={model_kind(ladder, kind)}"]
            common += [f"model.{key}={value}" for key, value in model.items()]
            sized = load_config(base, common)
            per_step = sized.data.micro_batch_size * sized.data.seq_len * sized.train.grad_accum_steps
            steps = {b: math.ceil(b / (per_step * ladder.data_parallel_ranks)) for b in ladder.budgets}
            ranks = ladder.data_parallel_ranks * sized.parallel.tensor_parallel * sized.parallel.pipeline_parallel
            lr = ladder.lr_base * (ladder.lr_ref_dim / sized.model.dim) ** ladder.lr_width_power
            schedule = _wsd_plan(ladder, steps) if ladder.schedule == Schedule.wsd else None
            output_dir = Path(ladder.output_dir) / ladder.name
            names = {b: f"{ladder.name}-{kind}-{size}-{budget_label(b)}" for b in ladder.budgets}
            for budget in sorted(ladder.budgets, reverse=True) if schedule else ladder.budgets:
                name = names[budget]
                overrides = [
                    *common,
                    f"train.max_steps={steps[budget]}",
                    f"optim.lr={lr:.6g}",
                    f"train.run_name={name}",
                    f"train.output_dir={output_dir}",
                    "train.resume=auto",
                    f"train.checkpoint_interval_steps={max(1, steps[budget] // 4)}",
                    f"tracking.experiment={ladder.experiment or 'ladder-' + ladder.name}",
                    f"tracking.tags.ladder={ladder.name}",
                    f"tracking.tags.ladder_size={size}",
                    f"tracking.tags.ladder_kind={kind}",
                    f"tracking.tags.budget={budget}",
                    f"data.seed={plain.data.seed}",  # the same data order for every kind and size
                    f"parallel.expected_world_size={ranks}",
                ]
                trunk, point = "", None
                if schedule is None:
                    overrides.append(f"optim.warmup_steps={max(1, int(ladder.warmup_fraction * steps[budget]))}")
                else:
                    warmup, trunk_budget, branch_steps = schedule
                    overrides += ["optim.schedule=wsd", f"optim.decay_fraction={ladder.decay_fraction}"]
                    overrides.append(f"optim.warmup_steps={warmup}")
                    if budget == trunk_budget:
                        overrides.append(f"train.checkpoint_at_steps=[{','.join(map(str, branch_steps.values()))}]")
                    else:
                        trunk = names[trunk_budget]
                        point = output_dir / trunk / "checkpoints" / checkpoint_name(branch_steps[budget])
                        overrides.append(f"train.branch_from={point}")
                cfg: PretrainConfig = load_config(base, overrides)
                output = Path(cfg.train.output_dir)
                runs.append(
                    LadderRun(name, kind, size, budget, tuple(overrides), output, steps[budget], trunk, point, ranks)
                )
    return runs


def _wsd_plan(ladder: LadderConfig, steps: dict[int, int]) -> tuple[int, int, dict[int, int]]:
    """(warmup steps shared by all budgets, the trunk's budget, {branch budget: the step it leaves the trunk}): a
    branch leaves where its own decay starts, which lr_at computes from its length alone."""
    warmup = max(1, int(ladder.warmup_fraction * min(steps.values())))
    trunk = max(steps, key=lambda budget: steps[budget])
    probe = OptimConfig(schedule=Schedule.wsd, decay_fraction=ladder.decay_fraction, warmup_steps=warmup)
    branch_steps = {b: wsd_decay_start(probe, n) for b, n in steps.items() if b != trunk}
    if any(n == steps[trunk] for b, n in steps.items() if b != trunk):
        raise ConfigError(f"budgets {sorted(steps)} give equal step counts; a wsd ladder needs distinct ones")
    return warmup, trunk, branch_steps


def passes_over_data(base: Path, run: LadderRun, ranks: int, train_sizes: dict[str, int | str]) -> str:
    """How many times the run sees its training data ("1.75 passes"), or why that is unknown (shards not made yet).
    Train sizes are cached per data config: every run of a ladder shares one."""
    cfg: PretrainConfig = load_config(base, run.overrides)
    key = repr(cfg.data)
    if key not in train_sizes:
        try:
            train_sizes[key] = len(cfg.data.build_datasets(cfg.model)[0])
        except (OSError, ValueError, RuntimeError) as error:  # missing or unreadable data: report, plan anyway
            train_sizes[key] = f"data not readable: {str(error).splitlines()[0]}"
    size = train_sizes[key]
    if isinstance(size, str):
        return size
    seen = run.max_steps * cfg.data.micro_batch_size * cfg.train.grad_accum_steps * ranks
    return f"{seen / size:.2f} passes over {size:,} training samples"


def _entry(base: Path, run: LadderRun) -> list[str]:
    return [str(ENTRY_POINT), str(base), *run.overrides]


def run_command(base: Path, run: LadderRun) -> list[str]:
    """One process for a 1-rank run; torchrun with a private rendezvous on this machine for more."""
    if run.ranks == 1:
        return [sys.executable, *_entry(base, run)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.ranks}"]
    return [sys.executable, *launcher, *_entry(base, run)]


def slurm_task_command(base: Path, run: LadderRun, tasks: int) -> list[str]:
    """Inside a SLURM job of `tasks` tasks: srun starts the run's ranks on them, which must be exactly the planned
    number (one-line error otherwise)."""
    if tasks != run.ranks:
        raise SystemExit(
            f"{run.name} needs {run.ranks} ranks but this SLURM job has {tasks} task(s): submit it with "
            f"--ntasks {run.ranks} (and the GPUs per task the ladder's gpus_per_rank says)"
        )
    process = [sys.executable, *_entry(base, run)]
    return process if run.ranks == 1 else ["srun", "--kill-on-bad-exit=1", f"--ntasks={run.ranks}", *process]


def _check_trunk(run: LadderRun) -> None:
    """A branch starts from its trunk's checkpoint: refuse clearly when that is not there yet."""
    point = run.branch_point
    if point is not None and not (run.output_dir / run.name / "checkpoints").exists() and not point.exists():
        raise SystemExit(f"{run.name} branches from {point}, which {run.trunk} has not written yet; run it first")


def run_locally(base: Path, runs: list[LadderRun], slurm_tasks: int = 0) -> None:
    """One run after another on this machine, or (slurm_tasks > 0) on the tasks of the SLURM job we are in."""
    todo = [r for r in runs if not r.is_finished()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}")
    for index, run in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {run.name}: {run.max_steps} steps on {run.ranks} rank(s)", flush=True)
        _check_trunk(run)
        command = slurm_task_command(base, run, slurm_tasks) if slurm_tasks else run_command(base, run)
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{run.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads((run.output_dir / run.name / "summary.json").read_text())
        print(
            f"    eval loss {summary.get('eval_loss', float('nan')):.4f} in {summary['wall_time_s']:.0f} s", flush=True
        )


def run_with_ray(base: Path, runs: list[LadderRun], cpus_per_rank: float, gpus_per_rank: float, address: str) -> None:
    """Each run is one Ray task holding all its ranks' CPUs and GPUs on one node (what a STRICT_PACK placement group
    would reserve), in which torchrun starts the ranks; runs spanning nodes belong to SLURM."""
    import ray

    if not ray.is_initialized():  # a caller may already be connected (tests, notebooks)
        ray.init(address=address or None, log_to_driver=False)

    @ray.remote
    def run_ranks(command: list[str]) -> tuple[int, str]:
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return proc.returncode, proc.stderr[-3000:]

    def train(run: LadderRun):
        resources = run_ranks.options(num_cpus=cpus_per_rank * run.ranks, num_gpus=gpus_per_rank * run.ranks)
        return resources.remote(run_command(base, run))

    todo = [r for r in runs if not r.is_finished()]
    waiting = {r.name for r in todo}  # a wsd branch is submitted once its trunk has finished
    blocked = [r for r in todo if r.trunk in waiting]
    pending = {train(run): run for run in todo if run not in blocked}
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(pending)} submitted to Ray")
    failed = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(done[0])
        code, stderr = ray.get(done[0])
        print(f"{run.name}: {'done' if code == 0 else f'FAILED (exit {code})'}", flush=True)
        if code:
            failed.append(f"{run.name}:\n{stderr}")
            failed += [
                f"{branch.name}: not run, its trunk {run.name} failed" for branch in blocked if branch.trunk == run.name
            ]
        else:
            pending.update({train(b): b for b in blocked if b.trunk == run.name})
    if failed:
        raise SystemExit("\n".join(failed))


def slurm_script(ladder_path: Path, ladder: LadderConfig, runs: list[LadderRun], sbatch_options: list[str]) -> str:
    """An sbatch job array, one array job per run (finished ones exit at once), each with the run's ranks as tasks;
    each calls `ebwm-ladder --index`, which starts the ranks with srun."""
    ranks = {run.ranks for run in runs}
    if len(ranks) > 1:
        raise SystemExit(f"--emit-slurm: the runs need different numbers of ranks {sorted(ranks)}; emit them apart")
    path = shlex.quote(str(ladder_path.resolve()))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=ladder-{ladder.name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        "#SBATCH --output=ladder-%A_%a.out",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks={ranks.pop()}",
        f"#SBATCH --cpus-per-task={ladder.cpus_per_rank}",
        *([f"#SBATCH --gpus-per-task={ladder.gpus_per_rank}"] if ladder.gpus_per_rank else []),
        *(f"#SBATCH {option}" for option in sbatch_options),
        "set -euo pipefail",
        f'{shlex.quote(sys.executable)} -m ebwm_scale.cli.ladder {path} --index "$SLURM_ARRAY_TASK_ID"',
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ebwm-ladder", description=__doc__.splitlines()[0])
    parser.add_argument("ladder", help="a ladder YAML (recipes/ladders/)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    parser.add_argument("--only", nargs="+", default=[], help="run names matching any of these patterns")
    parser.add_argument("--index", type=int, help="run only this run of the grid (a SLURM array task)")
    parser.add_argument("--emit-slurm", metavar="FILE", help="write an sbatch job-array script instead of running")
    parser.add_argument("--sbatch-option", action="append", default=[], help="extra #SBATCH line, e.g. --gres=gpu:8")
    parser.add_argument("--ray", action="store_true", help="run as Ray tasks (local Ray or --ray-address)")
    parser.add_argument("--ray-address", default="")
    parser.add_argument("--cpus-per-rank", type=float, help="Ray: CPUs per rank (default: the ladder's cpus_per_rank)")
    parser.add_argument("--gpus-per-rank", type=float, help="Ray: GPUs per rank (default: the ladder's gpus_per_rank)")
    args = parser.parse_args(argv)
    ladder, base = load_ladder(args.ladder)
    runs = expand(ladder, base)
    if args.only:
        runs = [r for r in runs if any(fnmatch.fnmatch(r.name, pattern) for pattern in args.only)]
        if not runs:
            raise SystemExit(f"no run matches {args.only}")
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise SystemExit(f"--index {args.index} is outside the {len(runs)} runs")
        runs = [runs[args.index]]
    if args.dry_run:
        train_sizes: dict[str, int | str] = {}
        for index, run in enumerate(runs):
            state = "done" if run.is_finished() else "todo"
            passes = passes_over_data(base, run, ladder.data_parallel_ranks, train_sizes)
            budget = budget_label(run.budget)
            print(
                f"{index:4d}  {state}  {run.name:40s} {run.max_steps:7d} steps  {budget:>6s}  {run.ranks} rank(s)  "
                f"{passes}"
            )
        return
    if args.emit_slurm:
        if any(run.trunk for run in runs):
            raise SystemExit(
                "--emit-slurm: a wsd ladder's branches must wait for their trunks, which one job array cannot say; "
                "emit the trunks first (--only the largest budget), then the rest, or use --ray"
            )
        Path(args.emit_slurm).write_text(slurm_script(Path(args.ladder), ladder, runs, args.sbatch_option))
        print(f"wrote {args.emit_slurm}: sbatch {args.emit_slurm} runs {len(runs)} array tasks")
        return
    if args.ray:
        cpus = ladder.cpus_per_rank if args.cpus_per_rank is None else args.cpus_per_rank
        gpus = ladder.gpus_per_rank if args.gpus_per_rank is None else args.gpus_per_rank
        run_with_ray(base, runs, cpus, gpus, args.ray_address)
    elif args.index is not None and "SLURM_JOB_ID" in os.environ:  # an array task: its ranks are its SLURM tasks
        run_locally(base, runs, slurm_tasks=int(os.environ.get("SLURM_NTASKS", "1")))
    else:
        run_locally(base, runs)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
