import json
import math
import subprocess
import sys

import pytest

from ebwm_scale.config import load_config
from ebwm_scale.pretrain import build_trainer, main
from tests.conftest import CPU, REPO
from tests.distributed import assert_gradients_close, record_gradients
from tests.helpers import SMALL, Recorder


def _train(tmp_path, recipe, *overrides):
    cfg = load_config(REPO / "recipes" / recipe, [*SMALL, f"train.output_dir={tmp_path}", *overrides])
    recorder = Recorder()
    summary = build_trainer(cfg, CPU, [recorder]).fit()
    return recorder, summary


def _mean_loss(records):
    return sum(m["loss"] for m in records) / len(records)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra, min_drop",
    [
        ("ci_tiny.yaml", ["data.seq_len=32", "data.micro_batch_size=16", "optim.lr=3e-3"], 1.0),
        ("ci_tiny_ar.yaml", ["data.seq_len=32", "data.micro_batch_size=16", "optim.lr=3e-3"], 1.0),
        ("ci_tiny_video.yaml", ["data.micro_batch_size=16", "data.video.num_clips=512"], 0.5),
        ("ci_tiny_video_ar.yaml", ["data.micro_batch_size=16", "data.video.num_clips=512"], 0.2),
    ],
)
def test_loss_decreases_within_100_steps(tmp_path, recipe, extra, min_drop):
    recorder, summary = _train(tmp_path, recipe, "train.max_steps=100", "optim.warmup_steps=10", *extra)
    first, last = _mean_loss(recorder.train[:10]), _mean_loss(recorder.train[-10:])
    assert last < first - min_drop, f"{recipe}: loss {first:.3f} -> {last:.3f}"
    assert math.isfinite(summary["eval_loss"]) and summary["steps"] == 100


def test_bf16_autocast_trains_ebt(tmp_path):
    recorder, _ = _train(tmp_path, "ci_tiny.yaml", "train.max_steps=3", "train.precision=bf16", "data.seq_len=16")
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in recorder.train)


@pytest.mark.parametrize("recipe", [pytest.param("ci_tiny.yaml", marks=pytest.mark.slow), "ci_tiny_ar.yaml"])
def test_grad_accumulation_matches_a_larger_batch(tmp_path, recipe):
    """2 x 4 and 4 x 2 accumulated give the gradient of 8 at once before the optimizer (a missing 1 / accumulation
    steps would double or quadruple it), and the same losses, up to float reassociation. The EBT starts its chains
    from zero (mcmc.init_scale=0), so every sample sees the same chain in any batching."""
    common = ["train.max_steps=3", "data.seq_len=16", "optim.warmup_steps=1", "optim.grad_clip=0"]
    common += ["mcmc.init_scale=0"] if recipe == "ci_tiny.yaml" else []

    def train(name: str, micro: int, accumulation: int):
        cfg = load_config(
            REPO / "recipes" / recipe,
            [*SMALL, *common, f"data.micro_batch_size={micro}", f"train.grad_accum_steps={accumulation}"]
            + [f"train.output_dir={tmp_path / name}"],
        )
        recorder = Recorder()
        trainer = build_trainer(cfg, CPU, [recorder])
        gradients = record_gradients(trainer.engine)
        trainer.fit()
        return [m["loss"] for m in recorder.train], gradients

    # The loader deals micro-batches from one permutation, so 2 x 4 and 4 x 2 cover the same samples as 8.
    losses, gradients = train("whole", 8, 1)
    for micro, accumulation in ((4, 2), (2, 4)):
        got_losses, got_gradients = train(f"{micro}x{accumulation}", micro, accumulation)
        assert got_losses == pytest.approx(losses, rel=1e-5)
        assert_gradients_close(got_gradients[0], gradients[0], rtol=1e-5)


@pytest.mark.slow
def test_pretrain_logs_to_mlflow_and_writes_config_and_summary(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = main(
        [
            str(REPO / "recipes" / "ci_tiny_video.yaml"),
            *SMALL,
            "tracking.enabled=true",
            f"tracking.uri={uri}",
            "train.max_steps=4",
            "train.log_interval_steps=2",
            f"train.output_dir={tmp_path}",
            "data.video.num_clips=64",
            "data.micro_batch_size=8",
        ]
    )
    run_dir = tmp_path / "ci_tiny_video"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4 == summary["steps"]
    assert load_config(run_dir / "config.yaml").train.max_steps == 4  # the saved config loads as a recipe
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ebwm-scale")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # created with the tag
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model_kind"] == "ebt"
    assert run.data.params["model.dim"] == "64" and run.data.params["mcmc.num_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert "eval/loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts


def test_pretrain_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "ebwm_scale" / "pretrain.py"),
            str(REPO / "recipes" / "ci_tiny_ar.yaml"),
            *SMALL,
            "train.max_steps=2",
            f"train.output_dir={tmp_path}",
            "data.seq_len=16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rank 0: step 2/2" in proc.stdout and "rank 0: run ci_tiny_ar finished: 2 steps on 1 rank(s)" in proc.stdout


@pytest.mark.slow
def test_a_wsd_decay_branch_equals_a_run_of_its_length_from_scratch(tmp_path):
    """One long warmup-stable-decay run, branched from its checkpoint where a shorter run's decay starts, then
    decayed to the shorter length: loss for loss the shorter run trained from scratch (same data order)."""
    wsd = ["data.seq_len=16", "data.micro_batch_size=4", "optim.schedule=wsd", "optim.warmup_steps=2"]
    wsd += ["optim.decay_fraction=0.25", "train.checkpoint_interval_steps=4", "train.keep_last_checkpoints=10"]
    trunk, _ = _train(tmp_path / "trunk", "ci_tiny.yaml", *wsd, "train.max_steps=24")
    fresh, _ = _train(tmp_path / "fresh", "ci_tiny.yaml", *wsd, "train.max_steps=16")
    branch_point = tmp_path / "trunk" / "ci_tiny" / "checkpoints" / "step_00000012"  # 16 - 0.25 * 16
    branch, _ = _train(tmp_path / "branch", "ci_tiny.yaml", *wsd, "train.max_steps=16", f"train.resume={branch_point}")
    losses = [[m["loss"] for m in run.train] for run in (trunk, fresh, branch)]
    assert losses[0][:12] == losses[1][:12]  # the stable phase does not know the run's length
    assert losses[0][12:16] != losses[1][12:16]  # the trunk keeps its lr, the short run decays
    assert losses[2] == losses[1][12:]  # the branch: exactly the short run's decay
