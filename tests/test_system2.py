"""System-2 training options of the MCMC core: the step schedule over landscapes, the step size per position, the
replay buffer (its order, storage and checkpoint state) and the recipe rules around them. The equations themselves
are pinned to the official code in tests/test_official_s2.py."""

import pytest
import torch

from ebwm_scale.config import ConfigError, load_config
from ebwm_scale.core.mcmc import MCMCConfig, ReplayConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.core.replay import ReplayBuffer
from tests.conftest import REPO, tiny_model_config

RECIPE_DIR = REPO / "recipes"


def _text_objective(**mcmc):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=29, step_conditioning="time_token", num_step_embeddings=2)
    return build_objective(cfg.build(), MCMCConfig(**{"alpha_init": 5.0, **mcmc}).build())


def test_repeats_stay_on_their_landscape_and_evaluation_takes_the_most():
    mcmc = MCMCConfig(num_steps=2, steps_per_landscape=2, max_steps_per_landscape=3).build()
    torch.manual_seed(0)
    schedules = [mcmc.sample_schedule() for _ in range(40)]
    for schedule in schedules:
        first, second = schedule.count(0), schedule.count(1)
        assert schedule == [0] * first + [1] * second and {first, second} <= {2, 3}
    assert {len(s) for s in schedules} == {4, 5, 6}
    assert mcmc.cfg.eval_schedule() == [0, 0, 0, 1, 1, 1] and mcmc.cfg.min_steps() == 4
    fixed = MCMCConfig(num_steps=3).build()
    assert fixed.sample_schedule() == [0, 1, 2] == fixed.cfg.eval_schedule()


def test_each_step_reads_its_landscape():
    objective = _text_objective(num_steps=1, steps_per_landscape=3)
    seen = []
    energy = objective.model.energy
    objective.model.energy = lambda context, candidate, step: seen.append(step) or energy(context, candidate, step)
    out = objective({"tokens": torch.randint(0, 29, (2, 6))})
    assert seen == [0, 0, 0] and set(out.metrics) >= {"loss_step0", "loss_step1", "loss_step2"}


def test_the_step_size_is_drawn_per_position_within_its_range():
    mcmc = MCMCConfig(alpha_init=4.0, step_size_scale=2.0).build()
    sizes = mcmc.step_size(mcmc.draw_step_sizes((64, 32)))
    assert sizes.shape == (64, 32, 1) and sizes.min() >= 2.0 and sizes.max() <= 8.0
    assert sizes.std() > 1.0 and mcmc.step_size().shape == ()
    sizes.sum().backward()  # alpha learns through every draw: d(low + u (high - low))/d alpha = 1/2 + 3u/2
    assert mcmc.alpha.grad.item() == pytest.approx(((sizes.detach() - 2.0) / 6.0 * 1.5 + 0.5).sum().item())


def test_a_frozen_alpha_keeps_no_chain():
    assert not MCMCConfig(detach_chain=False, loss_on="last", learn_alpha=False).keeps_chain
    assert MCMCConfig(detach_chain=False, loss_on="last").keeps_chain
    assert MCMCConfig(detach_chain=False, learn_alpha=False).keeps_chain  # every step's loss reaches the weights
    assert not MCMCConfig(loss_on="last").keeps_chain


def _sequences(count, start=0):
    return torch.arange(start, start + count)[:, None].repeat(1, 5)  # row i holds the number i


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_buffer_is_first_in_first_out_and_replays_stored_final_states(dtype):
    buffer = ReplayBuffer(ReplayConfig(size=5, sample_fraction=0.5, dtype=dtype))
    fresh, start = _sequences(4), torch.zeros(4, 4, 3)
    assert buffer.extend(fresh, start)[0] is fresh  # nothing held yet: the batch alone
    buffer.store(_sequences(4), torch.randn(6, 4, 3))  # 6 rows: 4 fresh, 2 replayed, which are not stored again
    finals = torch.randn(4, 4, 3)
    buffer.store(_sequences(4, start=4), finals)  # 8 stored in 5 slots: sequences 0-2 left first
    assert buffer.count == 5 and sorted(buffer.sequences[:, 0].tolist()) == [3, 4, 5, 6, 7]
    torch.manual_seed(0)
    sequences, states = buffer.extend(fresh, start)
    assert sequences.shape == (6, 5) and states.shape == (6, 4, 3)
    assert torch.equal(sequences[:4], fresh) and torch.equal(states[:4], start)  # fresh rows first
    for row in range(4, 6):
        number = int(sequences[row, 0])
        assert number in range(3, 8) and torch.equal(sequences[row], _sequences(1, number)[0])
        if number >= 4:
            expected = finals[number - 4].to(getattr(torch, dtype)).float()
            assert torch.equal(states[row], expected)
    assert buffer.states.dtype == getattr(torch, dtype)


def test_the_buffer_state_round_trips_and_refuses_another_size():
    buffer = ReplayBuffer(ReplayConfig(size=4, device="cpu"))
    buffer.store(_sequences(3), torch.randn(3, 4, 3))
    state = buffer.state_dict()
    copy = ReplayBuffer(ReplayConfig(size=4, device="cpu"))
    copy.load_state_dict(state, torch.device("cpu"))
    buffer.store(_sequences(3, 3), torch.full((3, 4, 3), 1.0))
    copy.store(_sequences(3, 3), torch.full((3, 4, 3), 1.0))
    assert copy.count == buffer.count == 4 and copy.next == buffer.next == 2
    assert torch.equal(copy.sequences, buffer.sequences) and torch.equal(copy.states, buffer.states)
    with pytest.raises(ValueError, match="mcmc.replay.size is 8"):
        ReplayBuffer(ReplayConfig(size=8)).load_state_dict(state, torch.device("cpu"))


def test_training_replays_earlier_sequences_from_their_final_states():
    objective = _text_objective(num_steps=2, replay=ReplayConfig(size=8, sample_fraction=0.5))
    first = torch.randint(0, 29, (4, 7))
    objective({"tokens": first})
    assert objective.replay.count == 4 and torch.equal(objective.replay.sequences[:4], first)
    stored = objective.replay.states[:4].clone()
    seen = []
    init = objective.init_state
    objective.init_state = lambda ctx: seen.append(ctx.shape[0]) or init(ctx)
    starts = []
    point = objective.space.point
    objective.space.point = lambda state, keep_graph=False, noise=0.0: starts.append(state) or point(state, keep_graph)
    out = objective({"tokens": torch.randint(0, 29, (4, 7))})
    assert seen == [4]  # start noise for the fresh rows only
    assert starts[0].shape[0] == 6 and any(torch.equal(starts[0][4], row) for row in stored)
    assert objective.replay.count == 8 and torch.isfinite(out.loss)


def _problem(*overrides):
    with pytest.raises(ConfigError) as error:
        load_config(RECIPE_DIR / "ci_tiny.yaml", list(overrides))
    return str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mcmc.steps_per_landscape=3", "mcmc.max_steps_per_landscape=2"], "mcmc.max_steps_per_landscape=2 is below"),
        (["mcmc.max_num_steps=3", "mcmc.max_steps_per_landscape=2"], "both randomize the step count: use one"),
        (["mcmc.step_size_scale=0.5"], "mcmc.step_size_scale=0.5 must be >= 1"),
        (["mcmc.replay.sample_fraction=0"], "mcmc.replay.sample_fraction=0.0 must lie in (0, 1]"),
        (["mcmc.replay.size=-1"], "mcmc.replay.size=-1 must be >= 0"),
        (["model.kind=ar", "mcmc.replay.size=8"], "mcmc.replay.size=8 needs model.kind=ebt"),
        (
            ["parallel.pipeline_parallel=2", "mcmc.detach_chain=false", "model.ebt_impl=split"],
            "mcmc.detach_chain=false with mcmc.loss_on=all",
        ),
        (
            ["parallel.pipeline_parallel=2", "parallel.pipeline_microbatches=8", "mcmc.replay.size=8"]
            + ["mcmc.replay.sample_fraction=0.25"],
            "parallel.pipeline_microbatches=8 must divide the micro-batch with its 4 replayed sequences (20",
        ),
    ],
)
def test_system2_recipe_errors_name_the_key(overrides, message):
    assert message in _problem(*overrides)


def test_the_official_system2_recipe_loads():
    cfg = load_config(RECIPE_DIR / "official" / "ebt_nlp_small_s2.yaml")
    mcmc = cfg.mcmc
    assert mcmc.eval_schedule() == [0, 0, 0] and not mcmc.keeps_chain and mcmc.replay.size == 192
    assert cfg.model.num_step_embeddings == 1
