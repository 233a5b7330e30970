"""The first losses of the tiny recipes, checked in: a change that moves them must say why.

These are recorded, not derived, on purpose: they are a regression pin, not a correctness proof. On the pinned CPU
torch every step is deterministic, so a refactor that should change no number (a module moved, a kernel swapped for
an equal one, a config default renamed) must leave the eight losses within 1e-4, and one that does move them shows up
here first. Whether the numbers are right is established elsewhere, against independent computations: the official
update rule in float64 (tests/test_official_rule.py), finite differences of the truncated gradient, parity of every
parallel layout with one process, and the text AR baseline's first loss against ln(vocabulary) below.

Regenerate after an intended change with `EBWM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`.
"""

import json
import math
import os
from pathlib import Path

import pytest

from ebwm_scale.config import load_config
from ebwm_scale.pretrain import build_trainer
from tests.conftest import CPU, REPO
from tests.helpers import SMALL, Recorder

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
RUNS = {
    "ci_tiny.yaml": ["data.seq_len=32", "data.micro_batch_size=8"],
    "ci_tiny_ar.yaml": ["data.seq_len=32", "data.micro_batch_size=8"],
    "ci_tiny_video.yaml": ["data.micro_batch_size=8", "data.video.num_clips=128"],
    "ci_tiny_video_ar.yaml": ["data.micro_batch_size=8", "data.video.num_clips=128"],
}


def _first_losses(recipe: str, tmp_path) -> list[float]:
    overrides = [*SMALL, *RUNS[recipe], "train.max_steps=8", f"train.output_dir={tmp_path}"]
    recorder = Recorder()
    build_trainer(load_config(REPO / "recipes" / recipe, overrides), CPU, [recorder]).fit()
    return [m["loss"] for m in recorder.train]


# ci_tiny_ar stays in the fast lane (`-m "not slow"`): the quickest of the four
@pytest.mark.parametrize(
    "recipe",
    [
        recipe if recipe == "ci_tiny_ar.yaml" else pytest.param(recipe, marks=pytest.mark.slow)
        for recipe in sorted(RUNS)
    ],
)
def test_first_losses_match_the_checked_in_curve(recipe, tmp_path):
    losses = _first_losses(recipe, tmp_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("EBWM_UPDATE_GOLDEN"):
        golden[recipe] = losses
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert recipe in golden, f"no golden curve for {recipe}; see the module docstring"
    assert losses == pytest.approx(golden[recipe], rel=1e-4)


@pytest.mark.slow
def test_an_untrained_text_baseline_starts_at_the_uniform_loss(tmp_path):
    """Independent of any recording: small-init logits are near zero, so the first cross-entropy is about ln(256)."""
    first = _first_losses("ci_tiny_ar.yaml", tmp_path)[0]
    assert first == pytest.approx(math.log(256), rel=0.02)
