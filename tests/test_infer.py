"""System-2 inference: thinking longer, best-of-N, early exit, uncertainty, and generation with a KV cache."""

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.core.spaces import FrameSpace
from ebwm_scale.inference.think import Generator, ThinkConfig, think
from tests.conftest import tiny_model_config
from tests.helpers import ON_TEXT_SHARDS, SMALL, trained_frames_objective


def _text_objective(**model):
    torch.manual_seed(0)
    cfg = tiny_model_config("ebt", "text", num_layers=2, num_step_embeddings=3, **model)
    return build_objective(cfg.build(), MCMCConfig(alpha_init=5.0, num_steps=3).build())


EUCLIDEAN = FrameSpace(lambda x: x, frame_dim=2, init_scale=1.0)  # the state is the candidate itself


def quadratic(target: torch.Tensor):
    """E = |pred - target|^2 per position: the minimum and every chain's final energy are known."""
    return lambda pred, step: ((pred - target) ** 2).sum(-1)


def test_best_of_n_keeps_the_lowest_energy_chain_per_position():
    target = torch.zeros(1, 3, 2)
    init = torch.tensor([[[3.0, 0], [0, 1], [2, 2]], [[1.0, 0], [0, 4], [1, 1]]])  # 2 chains x (1, 3, 2)
    thought = think(quadratic(target), EUCLIDEAN, init, torch.tensor(0.25), 1, ThinkConfig(best_of=2))
    finals = ((init * 0.5) ** 2).sum(-1)  # one step of size 0.25 on |x|^2 halves x
    assert torch.equal(thought.energy[0], finals.min(dim=0).values)
    assert torch.equal(thought.pred[0], (init * 0.5)[finals.argmin(dim=0), torch.arange(3)])
    assert torch.allclose(thought.energy_spread[0], finals.std(dim=0, unbiased=False))


def test_early_exit_stops_positions_that_stop_improving_and_counts_their_steps():
    target = torch.zeros(1, 2, 1)
    init = torch.tensor([[[8.0], [0.01]]])  # far from the minimum, and almost at it
    full = think(quadratic(target), EUCLIDEAN, init, torch.tensor(0.1), 10, ThinkConfig())
    early = think(quadratic(target), EUCLIDEAN, init, torch.tensor(0.1), 10, ThinkConfig(early_exit_eps=1e-3))
    assert full.steps_used.tolist() == [[10, 10]]
    assert early.steps_used[0, 0] == 10 and 1 <= early.steps_used[0, 1] < 10  # never more than the maximum
    assert early.energy[0, 1] < 1e-3


@pytest.mark.slow
def test_thinking_longer_never_raises_the_mean_energy_of_a_trained_model():
    objective, frames = trained_frames_objective()
    generator = Generator(objective, ThinkConfig())
    kv = generator.encode(frames[:, :-1])
    energies = []
    for num_steps in (1, 2, 4, 8):
        generator.num_steps = num_steps
        torch.manual_seed(1)
        energies.append(generator.predict_next(kv).energy.mean().item())
    assert energies == sorted(energies, reverse=True), energies


@pytest.mark.parametrize("conditioning", ["none", "time_token"])
def test_the_cached_prediction_is_the_full_models_energy_at_the_last_position(conditioning):
    objective = _text_objective(step_conditioning=conditioning)
    generator = Generator(objective, ThinkConfig(num_steps=1))
    tokens = torch.randint(0, 32, (2, 6))
    pred = torch.randn(2, 6, 32)
    for step in (0, 2):
        full = objective.model(tokens, pred, step)[:, -1]
        context = generator.encode(tokens[:, :3])
        objective.model.cache_context(context, 3)
        context = generator.encode(tokens[:, 3:], context)  # the cache built in two pieces
        cached = objective.model.energy(context, objective.model.embed_pred(pred[:, -1:]), step)[:, -1]
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modality", ["text", "text_time_token", pytest.param("frames", marks=pytest.mark.slow)])
def test_generation_with_the_cache_equals_generation_without(modality):
    if modality.startswith("text"):
        conditioning = "time_token" if modality == "text_time_token" else "none"
        # float64: three MCMC steps amplify the cache's fp32 round-off past any tolerance that would still catch a bug
        objective = _text_objective(step_conditioning=conditioning).double()
        context = torch.randint(0, 32, (2, 4))
    else:
        objective, frames = trained_frames_objective()
        context = frames[:2, :4]
    generator = Generator(objective, ThinkConfig(num_steps=3, best_of=2))
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        outputs.append(generator.generate(context, 4, use_cache=use_cache))
    (cached, cached_thoughts), (plain, plain_thoughts) = outputs
    assert cached.shape[1] == context.shape[1] + 4
    tol = 1e-10 if modality.startswith("text") else 1e-5
    torch.testing.assert_close(cached.double(), plain.double(), rtol=tol, atol=tol)
    for a, b in zip(cached_thoughts, plain_thoughts):
        torch.testing.assert_close(a.energy.double(), b.energy.double(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_system2_eval_curves_for_ebt_and_the_flat_ar_contrast(tmp_path):
    """ebwm-eval on tiny trained EBT and AR checkpoints: loss per steps x best-of, in and out of distribution."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from ebwm_scale.config import load_config
    from ebwm_scale.pretrain import build_trainer
    from tests.conftest import CPU, REPO

    results = {}
    for recipe in ("ci_tiny.yaml", "ci_tiny_ar.yaml"):
        overrides = [*SMALL, "train.max_steps=20", f"train.output_dir={tmp_path}"]
        build_trainer(load_config(REPO / "recipes" / recipe, overrides), CPU).fit()
        checkpoints = tmp_path / recipe.removesuffix(".yaml") / "checkpoints"
        out = tmp_path / f"eval-{recipe}"
        command = [sys.executable, "-m", "ebwm_scale.cli.evaluate", str(checkpoints), "--latest", "--out", str(out)]
        command += ["--steps", "1,2,4", "--best-of", "1,2", "--batches", "1", "--batch-size", "4"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[recipe] = json.loads((out / "system2.json").read_text())
        with Image.open(out / "system2.png") as image:
            assert image.format == "PNG"
    ebt = results["ci_tiny.yaml"]
    assert ebt["ood"] == "stdlib code without docstrings"
    for split in ("in_distribution", "out_of_distribution"):
        assert set(ebt[split]) == {"1", "2"} and set(ebt[split]["2"]) == {"1", "2", "4"}
        assert all(-1 <= entry["energy_loss_correlation"] <= 1 for entry in ebt[split]["1"].values())
        first, more = ebt[split]["1"]["1"], ebt[split]["1"]["4"]
        assert first["change"] == 0 and first["change_interval"] == [0, 0]  # the reference point itself
        assert more["change"] == pytest.approx(more["loss"] - first["loss"], abs=1e-5)  # equal sequence lengths
        low, high = more["change_interval"]
        assert low < more["change"] < high and more["loss_interval"][0] < more["loss"] < more["loss_interval"][1]
    for split in ("in_distribution", "out_of_distribution"):
        flat = results["ci_tiny_ar.yaml"][split]["1"]
        assert flat["1"]["loss"] == flat["4"]["loss"] and "energy" not in flat["1"]  # nothing to think about


@pytest.mark.slow
def test_an_export_of_a_shards_run_generates_without_its_shards(text_shards, tmp_path, capsys):
    """The export carries the run's sentencepiece model (checked against the shards' meta.json), so ebwm-generate
    needs nothing else once the shards are gone."""
    import shutil

    from ebwm_scale.cli.generate import main as generate
    from ebwm_scale.config import load_config
    from ebwm_scale.inference.export import TOKENIZER_FILE, export_checkpoint
    from ebwm_scale.pretrain import build_trainer
    from tests.conftest import CPU, REPO

    shards = tmp_path / "shards"
    shutil.copytree(text_shards.output, shards)
    overrides = [*SMALL, *ON_TEXT_SHARDS, "train.max_steps=2"]
    overrides += [f"data.shards.url={shards}", f"train.output_dir={tmp_path}"]
    build_trainer(load_config(REPO / "recipes" / "ci_tiny_shards.yaml", overrides), CPU).fit()
    export_checkpoint(str(tmp_path / "ci_tiny_shards" / "checkpoints" / "step_00000002"), str(tmp_path / "export"))
    assert (tmp_path / "export" / TOKENIZER_FILE).read_bytes() == (shards / TOKENIZER_FILE).read_bytes()
    shutil.rmtree(shards)
    generate([str(tmp_path / "export"), "--prompt", "def ", "--num-tokens", "3"])
    assert "3 tokens in" in capsys.readouterr().out

    # Before: any --tokenizer was used unchecked, and damaged weights loaded.
    from data_prep.text import TextPrepConfig, train_tokenizer
    from ebwm_scale.train.checkpoint import CheckpointError

    other = tmp_path / "other.model"
    other.write_bytes(
        train_tokenizer(["def f(x):\n    return x + 1\n" * 50], TextPrepConfig(inputs=[], output="", vocab_size=280))
    )
    with pytest.raises(CheckpointError, match="is not the tokenizer .* was trained with"):
        generate([str(tmp_path / "export"), "--prompt", "def ", "--num-tokens", "3", "--tokenizer", str(other)])
    weights = tmp_path / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match export.json"):
        generate([str(tmp_path / "export"), "--prompt", "def ", "--num-tokens", "3"])
