"""The thinking options against a float64 transcription of the official advanced inference (alexiglad/EBT,
model/nlp/ebt.py `ebt_advanced_inference` and `_run_ebt_inference_steps`, the time-embedded branch):

    alpha = alpha * o if 0 < o < 1 else (o if o >= 1 else alpha)        # --infer_ebt_override_alpha o
    for landscape in range(mcmc_num_steps):
        inner = 1 if final_landscape_only and landscape is not the last else infer_ebt_num_steps
        for _ in range(inner):                                          # step size: the trained one before the last
            s = s.detach() + noise * randn (on landscape 0 only: --infer_langevin_first_step)
            p = softmax(s); E = energy(p, landscape); g = dE/dp
            s = p - alpha * g   (--infer_accept_lower_energies: where(energy(softmax(that)) < E, that, p))
    final = energy(softmax(s), last landscape)
    keep per position the chain with min final, max final, or max (first E - final) (--infer_energy_sampling_technique)

The energy is the literal [time token ; real ; predicted] sequence of tests/test_official_rule.py; ThinkConfig runs
the training loop's step (core/mcmc.py refine) through think_about on the model's cached context.
"""

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig, refine
from ebwm_scale.core.objective import build_objective
from ebwm_scale.core.spaces import FrameSpace
from ebwm_scale.inference.think import Generator, Selection, ThinkConfig, think, think_about
from tests.conftest import tiny_model_config
from tests.helpers import OFFICIAL_VOCAB as VOCAB
from tests.helpers import official_energy, official_rule_objective

LANDSCAPES = 3


def official_inference(
    objective,
    ctx: torch.Tensor,
    init: torch.Tensor,
    *,
    infer_ebt_num_steps: int = 1,
    steps_final_landscape: bool = False,
    override_alpha: float = 0.0,
    alpha_final_landscape: bool = False,
    noise: float = 0.0,
    langevin_first_step: bool = False,
    accept_lower: bool = False,
    rejected_keeps_probabilities: bool = True,
    samples: int = 1,
    technique: str = "min",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the chosen final state (B, S, V), its final energy (B, S)); chains stacked along dim 0 as in think_about.
    rejected_keeps_probabilities=False: a rejected position keeps its state instead (this project's rule)."""
    model, landscapes = objective.model, objective.mcmc.cfg.num_steps
    trained = objective.mcmc.alpha.detach().squeeze(0)
    if 0 < override_alpha < 1:
        adjusted = trained * override_alpha
    else:
        adjusted = torch.tensor(override_alpha, dtype=trained.dtype) if override_alpha >= 1 else trained
    contexts = ctx.repeat(samples, 1)
    energies = []

    def get_energy(step_idx, tokens):
        return official_energy(model, contexts, torch.softmax(tokens, -1), step_idx)

    def do_mcmc_step(step_idx, state, alpha):
        cur = state.detach().requires_grad_()
        if not langevin_first_step or step_idx == 0:
            cur = cur + noise * torch.randn_like(cur)
        cur = torch.softmax(cur, -1)  # normalize_initial_condition
        energy = official_energy(model, contexts, cur, step_idx)
        energies.append(energy.detach())
        (grad,) = torch.autograd.grad(energy.sum(), cur)
        proposed = cur - alpha * grad
        if accept_lower:
            accept = (get_energy(step_idx, proposed) < energy)[..., None]
            return torch.where(accept, proposed, cur if rejected_keeps_probabilities else state).detach()
        return proposed.detach()

    state = init
    for step_idx in range(landscapes):
        if steps_final_landscape and step_idx != landscapes - 1:
            state = do_mcmc_step(step_idx, state, trained if alpha_final_landscape else adjusted)
        else:
            for _ in range(infer_ebt_num_steps):
                alpha = trained if (alpha_final_landscape and step_idx != landscapes - 1) else adjusted
                state = do_mcmc_step(step_idx, state, alpha)
    final = get_energy(landscapes - 1, state).detach().view(samples, *ctx.shape)
    if technique == "min":
        best = final.argmin(dim=0)
    elif technique == "max":
        best = final.argmax(dim=0)
    else:
        best = (energies[0].view(final.shape) - final).argmax(dim=0)
    rows, positions = torch.arange(ctx.shape[0])[:, None], torch.arange(ctx.shape[1])[None]
    return state.view(samples, *ctx.shape, -1)[best, rows, positions], final[best, rows, positions]


OPTIONS = {
    "default": ({}, {}),
    "steps_per_landscape": ({"steps_per_landscape": 2}, {"infer_ebt_num_steps": 2}),
    "final_landscape_only": (
        {"steps_per_landscape": 3, "final_landscape_only": True},
        {"infer_ebt_num_steps": 3, "steps_final_landscape": True},
    ),
    "alpha_factor": ({"alpha": 0.5}, {"override_alpha": 0.5}),
    "alpha_absolute": ({"alpha": 3.0}, {"override_alpha": 3.0}),
    "alpha_final_landscape": (
        {"steps_per_landscape": 2, "alpha": 0.25, "alpha_final_landscape": True},
        {"infer_ebt_num_steps": 2, "override_alpha": 0.25, "alpha_final_landscape": True},
    ),
    "alpha_final_landscape_only": (
        {"steps_per_landscape": 2, "final_landscape_only": True, "alpha": 4.0, "alpha_final_landscape": True},
        {"infer_ebt_num_steps": 2, "steps_final_landscape": True, "override_alpha": 4.0, "alpha_final_landscape": True},
    ),
    "langevin": ({"langevin_noise_std": 0.3}, {"noise": 0.3}),
    # the official noises every step on landscape 0: the first step only when that landscape has one step
    "langevin_first_step": (
        {
            "steps_per_landscape": 2,
            "final_landscape_only": True,
            "langevin_noise_std": 0.3,
            "langevin_first_step": True,
        },
        {"infer_ebt_num_steps": 2, "steps_final_landscape": True, "noise": 0.3, "langevin_first_step": True},
    ),
    "accept_lower_energy": (
        {"steps_per_landscape": 2, "alpha": 6.0, "accept_lower_energy": True},
        {"infer_ebt_num_steps": 2, "override_alpha": 6.0, "accept_lower": True, "rejected_keeps_probabilities": False},
    ),
    "best_of_min": ({"best_of": 3, "langevin_noise_std": 0.2}, {"samples": 3, "noise": 0.2}),
    "best_of_max": ({"best_of": 3, "select": Selection.max}, {"samples": 3, "technique": "max"}),
    "best_of_max_gap": ({"best_of": 3, "select": Selection.max_gap}, {"samples": 3, "technique": "max_gap"}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_equals_the_official_advanced_inference(name):
    ours, official = OPTIONS[name]
    objective = official_rule_objective(num_steps=LANDSCAPES)
    cfg = ThinkConfig(**ours)
    ctx = torch.randint(0, VOCAB, (2, 6))
    torch.manual_seed(7)
    thought = think_about(objective, objective.model.encode_context(ctx), 6, cfg.schedule(objective.mcmc.cfg), cfg)
    torch.manual_seed(7)
    init = torch.randn(cfg.best_of * 2, 6, VOCAB, dtype=torch.float64)
    expected_pred, expected_energy = official_inference(objective, ctx, init, **official)
    torch.testing.assert_close(thought.pred, expected_pred, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(thought.energy, expected_energy, rtol=1e-9, atol=1e-10)


def test_the_selections_pick_different_chains():
    """The best-of cases above are not all the same chain: min, max and max_gap disagree somewhere."""
    objective = official_rule_objective(num_steps=LANDSCAPES)
    ctx = torch.randint(0, VOCAB, (2, 6))
    picks = []
    for select in Selection:
        torch.manual_seed(7)
        cfg = ThinkConfig(best_of=3, select=select)
        picks.append(
            think_about(objective, objective.model.encode_context(ctx), 6, cfg.schedule(objective.mcmc.cfg), cfg)
        )
    assert not torch.equal(picks[0].energy, picks[1].energy)
    assert not torch.equal(picks[0].energy, picks[2].energy) and not torch.equal(picks[1].energy, picks[2].energy)


def _official_landscapes(landscapes: int, infer_ebt_num_steps: int, steps_final_landscape: bool) -> list[int]:
    """The landscape of each step of `_run_ebt_inference_steps` (time-embedded branch)."""
    sequence = []
    for step_idx in range(landscapes):
        if steps_final_landscape and step_idx != landscapes - 1:
            sequence.append(step_idx)
        else:
            sequence += [step_idx] * infer_ebt_num_steps
    return sequence


@pytest.mark.parametrize("final_only", [False, True])
@pytest.mark.parametrize("repeats", [1, 3])
def test_steps_per_landscape_give_the_official_landscape_sequence(repeats, final_only):
    mcmc = MCMCConfig(num_steps=3)
    schedule = ThinkConfig(steps_per_landscape=repeats, final_landscape_only=final_only).schedule(mcmc)
    assert schedule == _official_landscapes(3, repeats, final_only)
    assert ThinkConfig(steps_per_landscape=3, final_landscape_only=True).schedule(mcmc) == [0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="not both"):
        ThinkConfig(num_steps=2, steps_per_landscape=2).schedule(mcmc)


@pytest.mark.parametrize(
    ("mcmc", "expected"),
    [
        (MCMCConfig(num_steps=3), [0, 1, 2]),
        (MCMCConfig(num_steps=2, steps_per_landscape=2), [0, 0, 1, 1]),
        (MCMCConfig(num_steps=2, steps_per_landscape=1, max_steps_per_landscape=3), [0, 0, 0, 1, 1, 1]),
    ],
)
def test_without_a_step_count_a_model_thinks_with_its_trained_schedule(mcmc, expected):
    """Before: ebwm-generate without --steps ran range(mcmc.num_steps), one step per landscape, whatever the repeats
    the model was trained (and is evaluated) with."""
    objective = build_objective(tiny_model_config("ebt", "text", num_layers=1).build(), mcmc.build())
    assert Generator(objective, ThinkConfig()).num_steps == expected == mcmc.eval_schedule()
    assert Generator(objective, ThinkConfig(num_steps=5)).num_steps == 5


def test_alpha_override_is_a_factor_below_one_and_a_value_from_one():
    trained = torch.tensor(2.0)
    assert ThinkConfig().step_sizes(trained, 3, 3) is trained
    assert ThinkConfig(alpha=0.5).step_sizes(trained, 3, 3).item() == 1.0
    assert ThinkConfig(alpha=3.0).step_sizes(trained, 3, 3).item() == 3.0
    final_only = ThinkConfig(alpha=0.5, alpha_final_landscape=True)
    assert [a.item() for a in final_only.step_sizes(trained, [0, 0, 1, 1, 2, 2], 3)] == [2, 2, 2, 2, 1, 1]
    # a step count: step k on landscape k, those past the last trained landscape on it
    assert [a.item() for a in final_only.step_sizes(trained, 5, 3)] == [2, 2, 1, 1, 1]


EUCLIDEAN = FrameSpace(lambda x: x, frame_dim=1, init_scale=1.0)  # the state is the candidate itself
CURVATURE = torch.tensor([0.2, 0.9, 1.5, 3.0], dtype=torch.float64)[
    None, :, None
]  # alpha 0.5: positions 2 and 3 overshoot


def _bowls(pred: torch.Tensor, step: int) -> torch.Tensor:
    """E = c x^2 per position, whose curvature c makes a fixed step converge, or overshoot and climb."""
    return (CURVATURE * pred**2).sum(-1)


def test_accept_lower_energy_is_the_official_masked_update_and_never_climbs():
    init = torch.tensor([[[1.0], [-2.0], [0.5], [1.5]]], dtype=torch.float64)
    alpha, steps = torch.tensor(0.5, dtype=torch.float64), 4
    plain = refine(_bowls, EUCLIDEAN, init, alpha, steps, create_graph=False, final_energy=True)
    kept = refine(
        _bowls, EUCLIDEAN, init, alpha, steps, create_graph=False, accept_lower_energy=True, final_energy=True
    )
    expected = init
    for _ in range(steps):
        proposed = expected - alpha * (2 * CURVATURE * expected)
        expected = torch.where((_bowls(proposed, 0) < _bowls(expected, 0))[..., None], proposed, expected)
    torch.testing.assert_close(kept.pred, expected, rtol=0, atol=0)
    trace = torch.stack([*kept.energies, kept.final_energy])  # (steps + 1, 1, positions)
    assert (trace[1:] <= trace[:-1]).all()
    assert (plain.final_energy > plain.energies[0]).any()  # without it, the overshooting positions climb
    assert torch.equal(kept.pred[0, 3], init[0, 3])  # c alpha = 1.5: every step overshoots, none is taken


def test_accept_lower_energy_never_raises_a_text_positions_energy_on_one_landscape():
    """The text model, on landscape 0 with a step size large enough that some steps overshoot: every kept step lowers
    the energy, and a rejected position keeps its state, so its energy stays (the official keeps softmax(state) as
    the next state instead, which the next step's softmax flattens towards uniform)."""
    objective = official_rule_objective(num_steps=LANDSCAPES)
    ctx = torch.randint(0, VOCAB, (2, 6))
    energy_fn = objective.energy_fn(objective.model.encode_context(ctx))
    init = torch.randn(2, 6, VOCAB, dtype=torch.float64)
    alpha = torch.tensor(30.0, dtype=torch.float64)
    steps = [0] * 5
    plain = refine(energy_fn, objective.space, init, alpha, steps, create_graph=False, final_energy=True)
    kept = refine(
        energy_fn, objective.space, init, alpha, steps, create_graph=False, accept_lower_energy=True, final_energy=True
    )
    climbed = torch.stack([*plain.energies, plain.final_energy]).diff(dim=0) > 0
    assert climbed.any()  # the step size is large enough for some steps to climb
    trace = torch.stack([*kept.energies, kept.final_energy])
    assert (trace.diff(dim=0) <= 1e-12).all()
    assert (trace.diff(dim=0) < 0).any()


def test_keeping_the_state_of_a_rejected_step_ends_lower_than_the_officials_probabilities():
    """Why a rejected position keeps its state: the official's literal rule (keep p = softmax(state), which the next
    step softmaxes again) ends at a higher mean energy than plain descent, ours at a lower one."""
    objective = official_rule_objective(num_steps=LANDSCAPES)
    ctx = torch.randint(0, VOCAB, (2, 6))
    init = torch.randn(2, 6, VOCAB, dtype=torch.float64)
    options = {"infer_ebt_num_steps": 2, "override_alpha": 6.0}
    _, plain = official_inference(objective, ctx, init, **options)
    _, official = official_inference(objective, ctx, init, **options, accept_lower=True)
    _, ours = official_inference(objective, ctx, init, **options, accept_lower=True, rejected_keeps_probabilities=False)
    assert ours.mean() < plain.mean() < official.mean()


def test_langevin_on_the_first_step_only():
    init = torch.tensor([[[1.0], [-2.0], [0.5], [1.5]]], dtype=torch.float64)
    alpha = torch.tensor(0.1, dtype=torch.float64)
    torch.manual_seed(3)
    result = refine(
        _bowls, EUCLIDEAN, init, alpha, 3, create_graph=False, langevin_noise_std=0.5, langevin_first_step=True
    )
    torch.manual_seed(3)
    noisy = init + 0.5 * torch.randn_like(init)  # a frame state's noise moves what the energy reads, not the state
    expected = init - alpha * (2 * CURVATURE * noisy)
    for _ in range(2):
        expected = expected - alpha * (2 * CURVATURE * expected)
    torch.testing.assert_close(result.pred, expected, rtol=1e-12, atol=0)


def test_max_gap_keeps_the_chain_with_the_largest_drop_and_max_the_highest_final_energy():
    """Two chains per position on E = c x^2, one step: the drop c x^2 (1 - (1 - 2 c alpha)^2) and the final
    energy order the chains differently from the lowest final energy."""
    init = torch.tensor([[[1.0], [-2.0], [0.5], [1.5]], [[3.0], [0.1], [-1.0], [0.2]]], dtype=torch.float64)
    alpha = torch.tensor(0.2, dtype=torch.float64)
    first = _bowls(init, 0)
    final = _bowls(init - alpha * (2 * CURVATURE * init), 0)
    chosen = {}
    for select in Selection:
        thought = think(_bowls, EUCLIDEAN, init, alpha, 1, ThinkConfig(best_of=2, select=select))
        chosen[select] = thought.energy[0]
    assert torch.equal(chosen[Selection.min], final.min(dim=0).values)
    assert torch.equal(chosen[Selection.max], final.max(dim=0).values)
    gap_pick = (first - final).argmax(dim=0)
    assert torch.equal(chosen[Selection.max_gap], final[gap_pick, torch.arange(4)])
    assert not torch.equal(gap_pick, final.argmin(dim=0))  # max_gap is not min here


def test_cli_option_modifiers_need_what_they_modify():
    from ebwm_scale.cli.generate import main as generate

    for argv in (["--alpha-final-landscape"], ["--langevin-first-step"], ["--final-landscape-only"]):
        with pytest.raises(SystemExit):
            generate(["unused", "--prompt", "x", *argv])
    with pytest.raises(SystemExit):
        generate(["unused", "--prompt", "x", "--steps", "2", "--steps-per-landscape", "2"])


def test_eval_points_label_each_schedule():
    from ebwm_scale.cli.evaluate import schedules

    mcmc = MCMCConfig(num_steps=2, steps_per_landscape=2)
    points = schedules(["trained", 1, 4], [1, 3], ThinkConfig(final_landscape_only=True), mcmc)
    assert points == {"trained": [0, 0, 1, 1], "1": 1, "4": 4, "1x": [0, 1], "3x": [0, 1, 1, 1]}
