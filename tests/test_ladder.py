"""Ladders: grid expansion and names, one-line errors, and a real tiny ladder that is interrupted, resumed and fitted
(from summary files and from MLflow)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebwm_scale.cli.ladder import expand, load_ladder, main, run_command, slurm_script, slurm_task_command
from ebwm_scale.config import ConfigError
from tests.conftest import REPO
from tests.helpers import two_rank_ladder


@pytest.mark.slow
def test_grid_expands_to_stably_named_runs_with_the_lr_rule():
    ladder, base = load_ladder(REPO / "recipes" / "ladders" / "nlp_tiny_cpu.yaml")
    runs = expand(ladder, base)
    assert len(runs) == 4 * 3 * 4 and len({r.name for r in runs}) == 48
    assert runs[0].name == "nlp_tiny_cpu-ebt-s1-64k" and runs[-1].name == "nlp_tiny_cpu-ebt_s2-s3-512k"
    by_name = {r.name: r for r in runs}
    logits = by_name["nlp_tiny_cpu-ebt_logits-s1-64k"].overrides
    assert {"model.kind=ebt", "mcmc.update_space=logits", "tracking.tags.ladder_kind=ebt_logits"} <= set(logits)
    assert {"mcmc.replay.size=192", "mcmc.detach_chain=false"} <= set(by_name["nlp_tiny_cpu-ebt_s2-s1-64k"].overrides)
    assert by_name["nlp_tiny_cpu-ar-s2-256k"].max_steps == 250  # 256k tokens / (16 x 64)
    lr = {r.name: next(o for o in r.overrides if o.startswith("optim.lr=")) for r in runs}
    assert lr["nlp_tiny_cpu-ebt-s1-64k"] == "optim.lr=0.00266667"  # 1e-3 x 128 / 48
    seeds = {next(o for o in r.overrides if o.startswith("data.seed=")) for r in runs}
    assert seeds == {"data.seed=0"}  # every kind and size sees the same data in the same order
    for name in ("video_tiny_cpu", "nlp_paper", "video_paper"):
        assert expand(*load_ladder(REPO / "recipes" / "ladders" / f"{name}.yaml"))


def test_bad_ladders_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"name: x\nbase: {REPO}/recipes/ci_tiny.yaml\nsizes: {{s: {{dim: 64}}}}\nbudgets: [1000]\nwidth: 3\n"
    )
    with pytest.raises(ConfigError, match="width"):
        load_ladder(path)
    path.write_text(f"name: x\nbase: {REPO}/recipes/ci_tiny.yaml\nsizes: {{s: {{dim: 63}}}}\nbudgets: [1000]\n")
    with pytest.raises(ConfigError, match="model.num_heads=4 does not divide model.dim=63"):
        expand(*load_ladder(path))
    path.write_text(f"name: x\nbase: {REPO}/recipes/ci_tiny.yaml\nsizes: {{s: {{}}}}\nbudgets: [1000]\nkinds: [big]\n")
    with pytest.raises(ConfigError, match="'big' is neither ebt nor ar, and kind_overrides.big sets no model.kind"):
        load_ladder(path)


def test_slurm_array_has_one_job_per_run_with_its_ranks_as_tasks(tmp_path):
    ladder_path = REPO / "recipes" / "ladders" / "nlp_paper.yaml"
    ladder, base = load_ladder(ladder_path)
    runs = expand(ladder, base)
    script = slurm_script(ladder_path, ladder, runs, ["--partition=gpu"])
    assert f"#SBATCH --array=0-{len(runs) - 1}" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --ntasks=8" in script and "#SBATCH --gpus-per-task=1" in script
    assert '--index "$SLURM_ARRAY_TASK_ID"' in script


@pytest.mark.slow
def test_every_run_is_launched_on_the_ranks_its_budget_was_divided_by():
    ladder, base = load_ladder(REPO / "recipes" / "ladders" / "nlp_paper.yaml")
    run = expand(ladder, base)[0]
    assert run.ranks == 8 and "parallel.expected_world_size=8" in run.overrides
    assert run_command(base, run)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8"]
    assert slurm_task_command(base, run, tasks=8)[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks=8"]
    with pytest.raises(SystemExit, match="needs 8 ranks but this SLURM job has 1 task"):
        slurm_task_command(base, run, tasks=1)
    tiny, tiny_base = load_ladder(REPO / "recipes" / "ladders" / "nlp_tiny_cpu.yaml")
    single = expand(tiny, tiny_base)[0]
    assert single.ranks == 1 and run_command(tiny_base, single)[1].endswith("pretrain.py")


@pytest.mark.slow
def test_a_run_launched_on_other_ranks_than_planned_stops_at_start(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ebwm_scale.pretrain",
            str(REPO / "recipes" / "ci_tiny.yaml"),
            "parallel.expected_world_size=2",
            f"train.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one line, exit 2
    assert proc.stderr.strip() == (
        "LaunchError: this run is planned for 2 ranks (parallel.expected_world_size) but was launched on 1; launch it "
        "with ebwm-ladder, or e.g. torchrun --nproc-per-node 2"
    )


@pytest.mark.slow
def test_a_two_rank_ladder_run_under_ray_trains_its_planned_tokens(tmp_path, ray_local):
    main([str(two_rank_ladder(tmp_path)), "--ray"])
    summary = json.loads((tmp_path / "runs" / "ranks" / "ranks-ar-s1-2.048k" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 16  # 2048 tokens / (2 ranks x 4 x 16)
    assert summary["scale"]["data"] == 2048 == summary["tokens"]


@pytest.mark.slow
def test_a_ladder_killed_mid_run_resumes_that_run_and_is_fitted(tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    ladder = tmp_path / "tiny.yaml"
    ladder.write_text(
        f"name: tiny\nbase: {REPO}/recipes/ci_tiny.yaml\nkinds: [ebt, ar]\n"
        "sizes:\n  s1: {dim: 32, num_layers: 1, num_heads: 2}\nbudgets: [2048, 32768]\n"
        f"output_dir: {tmp_path}/runs\n"
        "overrides: [train.eval_interval_steps=0, train.eval_batches=1, train.checkpoint_interval_steps=4, "
        f"train.progress_bar=false, tracking.uri='{tracking}']\n"
    )
    command = [sys.executable, "-m", "ebwm_scale.cli.ladder", str(ladder)]
    # The ladder runs tiny-ebt-s1-2.048k, then tiny-ebt-s1-32.768k (32 steps): killed, with its child, once that run
    # has its first checkpoint, as a preempted job would be.
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    victim = tmp_path / "runs" / "tiny" / "tiny-ebt-s1-32.768k"
    deadline = time.monotonic() + 300
    while not list(victim.glob("checkpoints/step_*/COMPLETE.json")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (victim / "summary.json").exists()  # killed midway, not after the run finished
    listing = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=120).stdout
    assert [line.split()[1] for line in listing.splitlines()] == ["done", "todo", "todo", "todo"]
    rest = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "1 of 4 runs already finished; running 3" in rest.stdout
    resumed = json.loads((victim / "summary.json").read_text())
    assert resumed["resumed_from"].endswith(("step_00000004", "step_00000008")) and resumed["steps"] == 32
    assert resumed["tokens"] == 32768  # the budget, not the budget plus the steps replayed after the kill
    summary = json.loads((tmp_path / "runs" / "tiny" / "tiny-ar-s1-32.768k" / "summary.json").read_text())
    assert summary["scale"] == {**summary["scale"], "kind": "ar", "data": 32768, "unit": "tokens"}

    for source in (["--runs-dir", f"{tmp_path}/runs/tiny"], ["--tracking-uri", tracking, "--mlflow"]):
        out = tmp_path / f"fit{len(source)}"
        fit = subprocess.run(
            [sys.executable, "-m", "ebwm_scale.cli.fit", "--ladder", "tiny", "--out", str(out), *source],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert fit.returncode == 0, fit.stderr[-2000:]
        result = json.loads((out / "summary.json").read_text())
        assert len(result["runs"]) == 4 and {p["kind"] for p in result["runs"]} == {"ebt", "ar"}
        assert "needs at least 6 runs" in result["kinds"]["ebt"]["not_fitted"]  # 2 runs a kind: no fit is made
    assert "logged to MLflow run fit-tiny" in fit.stdout


def _wsd_ladder(tmp_path, budgets: str, name: str = "wsd") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nbase: {REPO}/recipes/ci_tiny.yaml\nkinds: [ebt]\nschedule: wsd\ndecay_fraction: 0.25\n"
        f"sizes:\n  s1: {{dim: 32, num_layers: 1, num_heads: 2}}\nbudgets: {budgets}\noutput_dir: {tmp_path}/runs\n"
        "overrides: [train.eval_interval_steps=0, train.eval_batches=1, tracking.enabled=false, data.seq_len=16,"
        " data.micro_batch_size=4, train.log_interval_steps=1, train.progress_bar=false]\n"
    )
    return path


def test_a_wsd_ladder_plans_one_trunk_and_branches_at_their_decay_starts(tmp_path):
    runs = expand(*load_ladder(_wsd_ladder(tmp_path, "[1024, 2048, 4096]")))  # 16, 32, 64 steps of 64 tokens
    assert [(r.name, r.max_steps, r.trunk) for r in runs] == [
        ("wsd-ebt-s1-4.096k", 64, ""),
        ("wsd-ebt-s1-2.048k", 32, "wsd-ebt-s1-4.096k"),
        ("wsd-ebt-s1-1.024k", 16, "wsd-ebt-s1-4.096k"),
    ]
    trunk, *branches = runs
    assert "train.checkpoint_at_steps=[12,24]" in trunk.overrides  # 16 - 4, 32 - 8
    assert {o for o in trunk.overrides if o.startswith("optim.warmup_steps=")} == {"optim.warmup_steps=1"}
    assert [o.rsplit("/", 1)[-1] for b in branches for o in b.overrides if "branch_from" in o] == [
        "step_00000024",
        "step_00000012",
    ]
    with pytest.raises(SystemExit, match="cannot say"):
        from ebwm_scale.cli.ladder import main

        main([str(_wsd_ladder(tmp_path, "[1024, 2048]")), "--emit-slurm", str(tmp_path / "x.sbatch")])
    with pytest.raises(ConfigError, match="schedule='linear' is not one of cosine, wsd"):
        path = _wsd_ladder(tmp_path, "[1024]")
        path.write_text(path.read_text().replace("schedule: wsd", "schedule: linear"))
        load_ladder(path)


@pytest.mark.slow
def test_a_wsd_ladder_branch_trains_exactly_like_its_budget_from_scratch(tmp_path):
    """The ladder trains the trunk, then a branch from the trunk's checkpoint; the branch's losses are those of a
    plain wsd run of the branch's length."""
    ladder = _wsd_ladder(tmp_path, "[1024, 2048]")
    done = subprocess.run([sys.executable, "-m", "ebwm_scale.cli.ladder", str(ladder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[1/2] wsd-ebt-s1-2.048k: 32 steps" in done.stdout and "[2/2] wsd-ebt-s1-1.024k: 16 steps" in done.stdout
    branch = next(r for r in expand(*load_ladder(ladder)) if r.trunk)
    fresh = [o for o in branch.overrides if not o.startswith(("train.branch_from=", "train.output_dir="))]
    scratch = subprocess.run(
        [
            sys.executable,
            str(REPO / "ebwm_scale" / "pretrain.py"),
            str(REPO / "recipes" / "ci_tiny.yaml"),
            *fresh,
            f"train.output_dir={tmp_path}/scratch",
        ],
        capture_output=True,
        text=True,
    )
    assert scratch.returncode == 0, scratch.stderr[-2000:]

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["split"] == "train"}

    branched, plain = losses(tmp_path / "runs" / "wsd" / branch.name), losses(tmp_path / "scratch" / branch.name)
    assert sorted(branched) == list(range(13, 17)) and plain[16] and len(plain) == 16
    assert branched == {step: loss for step, loss in plain.items() if step > 12}
    summary = json.loads((tmp_path / "runs" / "wsd" / branch.name / "summary.json").read_text())
    assert summary["resumed_from"].endswith("wsd-ebt-s1-2.048k/checkpoints/step_00000012")


def test_a_dry_run_says_how_often_each_run_sees_its_data(tmp_path):
    """Passes over the training samples per run (the operator's check against repeating data), or why unknown."""
    from ebwm_scale.cli.ladder import passes_over_data
    from ebwm_scale.data.text import stdlib_docs_splits

    ladder_path = _wsd_ladder(tmp_path, "[1024, 2048]")
    ladder, base = load_ladder(ladder_path)
    runs, sizes = expand(ladder, base), {}
    windows = len(stdlib_docs_splits(16, 5.0)[0])  # seq_len 16, the default 5 % held out
    for run in runs:
        assert (
            passes_over_data(base, run, 1, sizes)
            == f"{run.max_steps * 4 / windows:.2f} passes over {windows:,} training samples"
        )
    assert len(sizes) == 1  # one data config, read once
    shards = load_ladder(REPO / "recipes" / "ladders" / "video_tiny_cpu.yaml")
    video_run = expand(*shards)[0]
    unmade = dataclasses.replace(video_run, overrides=(*video_run.overrides, f"data.shards.url={tmp_path}/unmade"))
    assert passes_over_data(shards[1], unmade, 1, {}).startswith("data not readable: ")
