"""A real SLURM on this machine (cluster/slurm/local_cluster.sh, two nodes served by two slurmd): pretrain.sbatch
on 2 CPU tasks, preempted with `scancel --signal=USR1 --batch`, requeues itself and resumes from its checkpoint onto
the uninterrupted losses; a job over both nodes follows one process; a ladder's array job starts its planned ranks;
the prep script runs a Ray job inside an allocation. Needs root and the Debian packages slurm-wlm and munge (.ci/run
installs them, and sets EBWM_REQUIRE_SLURM so that a missing SLURM fails there instead of skipping)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import LAUNCHED, QUIET, train_launched, two_rank_ladder

SLURM = REPO / "cluster" / "slurm"
pytestmark = pytest.mark.slow
TRAIN = [
    "train.max_steps=40",
    *QUIET,
    "train.log_interval_steps=1",
    "train.eval_batches=2",
    "model.dim=64",
    "data.seq_len=32",
]


def test_sbatch_scripts_parse():
    for script in [*SLURM.glob("*.sbatch"), SLURM / "local_cluster.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        reason = "a real SLURM needs root and the Debian packages slurm-wlm and munge (.ci/run installs them)"
        if os.environ.get("EBWM_REQUIRE_SLURM"):  # CI: never skip silently
            pytest.fail(reason)
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        [str(SLURM / "local_cluster.sh"), "start", str(state)],
        capture_output=True,
        text=True,
        env={**os.environ, "EBWM_SLURM_NODES": "2"},
    )
    assert start.returncode == 0, start.stderr + start.stdout
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run([str(SLURM / "local_cluster.sh"), "stop", str(state)], check=False)


def _submit(env, *args) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(env, job_id: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {_job(env, job_id).get('JobState')} after {timeout} s")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row.get("split") == "train"}


def test_a_preempted_job_requeues_and_resumes_exactly(slurm, tmp_path):
    def submit(name: str) -> str:
        out = tmp_path / name
        out.mkdir()
        args = ["--ntasks-per-node=2", f"--output={out}/slurm-%j.out", str(SLURM / "pretrain.sbatch")]
        return _submit(slurm, *args, "recipes/ci_tiny.yaml", *TRAIN, f"train.output_dir={out}")

    straight = submit("straight")
    assert _wait(slurm, straight)["JobState"] == "COMPLETED"

    preempted = submit("preempted")
    metrics = tmp_path / "preempted" / "ci_tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 8):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], env=slurm, check=True)
    job = _wait(slurm, preempted)
    log = next((tmp_path / "preempted").glob("slurm-*.out")).read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    assert "checkpointed; requeueing" in log and "(restart 1)" in log
    summary = json.loads((tmp_path / "preempted" / "ci_tiny" / "summary.json").read_text())
    assert summary["status"] == "finished" and "checkpoints/step_" in summary["resumed_from"]
    expected = _losses(tmp_path / "straight" / "ci_tiny")
    assert len(expected) == 40 and _losses(tmp_path / "preempted" / "ci_tiny") == expected  # bit for bit


def test_prep_runs_a_ray_job_inside_the_allocation(slurm, stdlib_jsonl, tmp_path):
    out = tmp_path / "shards"
    args = [f"--output={tmp_path}/prep-%j.out", str(SLURM / "prep.sbatch"), "text"]
    args += ["--input", f"{stdlib_jsonl}/*.jsonl", "--output", str(out), "--vocab-size", "512", "--seq-len", "32"]
    job = _submit(slurm, *args, "--shard-mb", "0.2")
    assert _wait(slurm, job)["JobState"] == "COMPLETED", next(tmp_path.glob("prep-*.out")).read_text()[-3000:]
    assert json.loads((out / "meta.json").read_text())["counts"]["documents"] > 500


def test_a_ladder_array_job_starts_its_planned_ranks_with_srun(slurm, tmp_path):
    ladder = str(two_rank_ladder(tmp_path))
    few = _submit(
        slurm, "--array=0-0", "--ntasks=1", f"--output={tmp_path}/few-%a.out", str(SLURM / "ladder.sbatch"), ladder
    )
    assert _wait(slurm, few)["JobState"] == "FAILED"
    assert "needs 2 ranks but this SLURM job has 1 task(s)" in (tmp_path / "few-0.out").read_text()

    job = _submit(
        slurm, "--array=0-0", "--ntasks=2", f"--output={tmp_path}/ok-%a.out", str(SLURM / "ladder.sbatch"), ladder
    )
    assert _wait(slurm, job)["JobState"] == "COMPLETED", (tmp_path / "ok-0.out").read_text()[-3000:]
    summary = json.loads((tmp_path / "runs" / "ranks" / "ranks-ar-s1-2.048k" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["scale"]["data"] == 2048 == summary["tokens"]


def test_a_job_over_two_nodes_matches_one_process(slurm, tmp_path):
    _, one = train_launched([[sys.executable]], tmp_path / "one", "data.micro_batch_size=8")
    out = tmp_path / "nodes"
    args = ["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/nodes-%j.out", str(SLURM / "pretrain.sbatch")]
    job = _submit(slurm, *args, *LAUNCHED, "data.micro_batch_size=4", f"train.output_dir={out}")

    def log() -> str:
        return next(tmp_path.glob("nodes-*.out")).read_text()[-3000:]

    assert _wait(slurm, job)["JobState"] == "COMPLETED", log()
    assert re.search(r"on \S+,\S+-second: 2 tasks", log()), log()  # one task on each node
    got = _losses(out / "ci_tiny_ar")
    assert len(got) == len(one) == 5 and all(abs(got[s + 1] - b) < 1e-4 * abs(b) for s, b in enumerate(one))
