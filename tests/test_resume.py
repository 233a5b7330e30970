"""Exact resume: N steps straight == k steps, SIGKILL, resume, finish — losses and weights bit for bit (System-2
training too: its replay buffer is part of the run's state)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebwm_scale.inference.export import load_checkpoint
from tests.conftest import REPO
from tests.helpers import ON_TEXT_SHARDS, QUIET, train_records

NOISY_MCMC = [
    "mcmc.langevin_noise_std=0.05",
    "mcmc.max_num_steps=3",
    "mcmc.alpha_jitter=0.2",
    "model.step_conditioning=time_token",
]  # so that every RNG stream matters
SYSTEM2_MCMC = [
    "mcmc.num_steps=1",
    "mcmc.steps_per_landscape=2",
    "mcmc.max_steps_per_landscape=3",
    "mcmc.step_size_scale=2.0",
    "mcmc.langevin_noise_std=0.5",
    "mcmc.langevin_at_eval=true",
    "mcmc.detach_chain=false",
    "mcmc.loss_on=last",
    "mcmc.replay.size=6",  # 4 fresh + 2 replayed per step: full after 2 steps, wrapping around from then on
    "model.step_conditioning=time_token",
]
RUNS = {
    "text": ["ci_tiny.yaml", "data.seq_len=16", "data.micro_batch_size=4", *NOISY_MCMC],
    "frames": ["ci_tiny_video.yaml", "data.micro_batch_size=4", "data.video.num_clips=128", *NOISY_MCMC],
    # Shards from the Ray prep job, streamed by 2 DataLoader workers (the url is added from the fixture).
    "shards": ["ci_tiny_shards.yaml", *ON_TEXT_SHARDS, "data.shards.num_workers=2", *NOISY_MCMC],
}
RUNS["mixture"] = RUNS["shards"]
RUNS["system2"] = ["ci_tiny.yaml", "data.seq_len=16", "data.micro_batch_size=4", *SYSTEM2_MCMC]
MAX_STEPS = 24


def _command(modality: str, output_dir: Path, *extra: str) -> list[str]:
    recipe, *overrides = RUNS[modality]
    return [
        sys.executable,
        str(REPO / "ebwm_scale" / "pretrain.py"),
        str(REPO / "recipes" / recipe),
        *overrides,
        "model.dim=32",
        "model.num_heads=2",
        f"train.max_steps={MAX_STEPS}",
        "train.checkpoint_interval_steps=3",
        "train.eval_interval_steps=4",
        "train.eval_batches=1",
        "train.log_interval_steps=1",
        *QUIET,
        f"train.output_dir={output_dir}",
        *extra,
    ]


def _final_weights(run_dir: Path):
    return load_checkpoint(str(run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"))[1].state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["text", "frames", "shards", "mixture", "system2"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, modality, request):
    run_name = RUNS[modality][0].removesuffix(".yaml")
    data = []
    if modality in ("shards", "mixture"):
        url = request.getfixturevalue("text_shards").output
        data = [f"data.shards.url={url}"]
        if modality == "mixture":  # the dataset twice, 2:1: two sources with their own orders and buffers
            data = ["data.shards.url=''", f"data.shards.sources=[{{url: {url}, weight: 2}}, {{url: {url}, weight: 1}}]"]
    straight = subprocess.run(
        _command(modality, tmp_path / "straight", *data), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(modality, killed_dir, *data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed_dir / run_name / "checkpoints" / "step_00000009" / "COMPLETE.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(train_records(killed_dir / run_name)) < MAX_STEPS

    resumed = subprocess.run(
        _command(modality, killed_dir, *data, "train.resume=auto"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout

    expected, got = train_records(tmp_path / "straight" / run_name), train_records(killed_dir / run_name)
    assert sorted(expected) == sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got == expected  # exact float equality, every step
    w_expected, w_got = _final_weights(tmp_path / "straight" / run_name), _final_weights(killed_dir / run_name)
    assert w_expected.keys() == w_got.keys()
    assert all((w_expected[k] == w_got[k]).all() for k in w_expected)
