"""The text EBT's MCMC against an independent float64 transcription of the official code's update
(alexiglad/EBT, model/nlp/ebt.py, EBT_NLP.forward; time token: model/ar_ebt_time_embed.py, EBTTimeConcat):

    s = s.detach()                                     # the state, B x S x V, starts as noise
    p = softmax(s)                                     # the variable is replaced by its probabilities
    E = energy([time token ; real ; p W^T])            # the time token leads; real i at RoPE i+1, prediction i at i+2
    g = autograd.grad(E.sum(), p, create_graph=True)   # w.r.t. the probabilities
    s = p - alpha * g
    loss += cross_entropy(s, target)                   # mean over the steps

The reference builds the whole sequence, its mask and its positions literally (loops), and shares only the
transformer blocks' weights with the model under test. Every layout (split / masked) and vocabulary-state
implementation (lean / plain) must reproduce its loss and every gradient, alpha included.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ebwm_scale.cli.evaluate import evaluate_batch
from ebwm_scale.core.mcmc import MCMCConfig, mcmc_step
from ebwm_scale.core.objective import build_objective
from tests.conftest import tiny_model_config
from tests.helpers import OFFICIAL_VOCAB, official_energy, official_rule_objective

VOCAB = OFFICIAL_VOCAB


def official_loss(objective, tokens: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    ctx, target = tokens[:, :-1], tokens[:, 1:]
    alpha = objective.mcmc.alpha.clamp(min=objective.mcmc.cfg.alpha_min).squeeze(0)
    state, total = init, 0.0
    num_steps = objective.mcmc.cfg.num_steps
    for step in range(num_steps):
        state = state.detach().requires_grad_()
        probs = torch.softmax(state, dim=-1)
        energy = official_energy(objective.model, ctx, probs, step)
        (grad,) = torch.autograd.grad(energy.sum(), probs, create_graph=True)
        state = probs - alpha * grad
        total = total + F.cross_entropy(state.flatten(0, 1), target.flatten())
    return total / num_steps


def _gradients(objective, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    objective.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("vocab_state", ["lean", "plain"])
@pytest.mark.parametrize("ebt_impl", ["split", "masked"])
@pytest.mark.parametrize("conditioning", ["time_token", "additive", "none"])
def test_training_loss_and_every_gradient_equal_the_official_rule(conditioning, ebt_impl, vocab_state, num_steps):
    objective = official_rule_objective(ebt_impl, vocab_state, conditioning, num_steps)
    tokens = torch.randint(0, VOCAB, (2, 8))
    init = torch.randn(2, 7, VOCAB, dtype=torch.float64)
    expected_loss = official_loss(objective, tokens, init)
    expected = _gradients(objective, expected_loss)
    objective.init_state = lambda ctx: init.clone()
    out = objective({"tokens": tokens})
    actual = _gradients(objective, out.loss)
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert actual.keys() == expected.keys() and "mcmc.alpha" in actual
    if conditioning != "none":
        assert "model.step_embeddings.weight" in actual
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_the_logit_rule_is_a_different_model():
    """The same weights and start under the earlier logit-space rule give another loss: the option is real."""
    tokens = torch.randint(0, VOCAB, (2, 8))
    init = torch.randn(2, 7, VOCAB, dtype=torch.float64)
    losses = []
    for update_space in ("probs", "logits"):
        objective = official_rule_objective(update_space=update_space)
        objective.init_state = lambda ctx: init.clone()
        losses.append(objective({"tokens": tokens}).loss.item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


class _FrozenChain(nn.Module):
    """The loss of K MCMC steps whose start states are given constants: what the truncated gradient (each step's
    state detached, the EBWM pseudocode) differentiates, as a plain function of the weights."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def forward(self, tokens: torch.Tensor, starts: list[torch.Tensor]) -> torch.Tensor:
        objective = self.objective
        ctx, target = tokens[:, :-1], tokens[:, 1:]
        energy_fn = objective.energy_fn(objective.model.encode_context(ctx))
        alpha = objective.mcmc.step_size()
        losses = []
        for step, start in enumerate(starts):
            state, _ = mcmc_step(energy_fn, objective.space, start, alpha, step, create_graph=True)
            losses.append(objective.space.loss(state, target))
        return torch.stack(losses).mean()


@pytest.mark.parametrize("update_space", ["probs", "logits"])
def test_three_step_truncated_gradient_matches_finite_differences(update_space):
    """float64: the training chain's gradient (3 steps, second order through every energy gradient) equals the
    exact gradient of the frozen-start chain, which finite differences confirm."""
    torch.manual_seed(0)
    cfg = tiny_model_config(
        num_layers=1, dim=16, num_heads=2, vocab_size=12, step_conditioning="time_token", num_step_embeddings=3
    )
    mcmc = MCMCConfig(num_steps=3, alpha_init=1.5, update_space=update_space, vocab_state="plain")
    objective = build_objective(cfg.build(), mcmc.build()).double()
    tokens = torch.randint(0, 12, (2, 5))
    init = torch.randn(2, 4, 12, dtype=torch.double)
    objective.init_state = lambda ctx: init.clone()
    out = objective({"tokens": tokens})
    chain_grads = _gradients(objective, out.loss)

    starts = _states_before_each_step(objective, tokens, init, 3)  # where the chain started each step
    frozen = _FrozenChain(objective)
    names = [
        "objective.model.transformer.layers.0.attention.wqkv.weight",
        "objective.model.vocab_to_embed.weight",
        "objective.model.step_embeddings.weight",
        "objective.mcmc.alpha",
    ]
    params = dict(frozen.named_parameters())
    frozen_loss = frozen(tokens, starts)
    assert frozen_loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    frozen_grads = torch.autograd.grad(frozen_loss, [params[n] for n in names])
    for name, grad in zip(names, frozen_grads, strict=True):
        torch.testing.assert_close(chain_grads[name.removeprefix("objective.")], grad, rtol=1e-10, atol=1e-12)

    def loss_of(*values):
        return torch.func.functional_call(frozen, {**params, **dict(zip(names, values))}, (tokens, starts))

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def _states_before_each_step(objective, tokens, init, num_steps) -> list[torch.Tensor]:
    """The chain's state before each step, without a graph (the constants of the frozen chain)."""
    energy_fn = objective.energy_fn(objective.model.encode_context(tokens[:, :-1]))
    states, state = [init], init
    for step in range(num_steps - 1):
        state, _ = mcmc_step(energy_fn, objective.space, state, objective.mcmc.step_size(), step, create_graph=False)
        states.append(state)
    return states


@pytest.mark.parametrize("update_space", ["probs", "logits"])
def test_evaluation_and_inference_run_the_training_chain(update_space):
    """Same weights, same start noise: the loss after each training step is the loss ebwm-eval's System-2 path
    (infer.think, best-of-1) reports for that many steps, and the state predict() reaches."""
    objective = official_rule_objective(update_space=update_space, num_steps=2)
    batch = {"tokens": torch.randint(0, VOCAB, (2, 8))}
    torch.manual_seed(5)
    out = objective(batch)
    for num_steps in (1, 2):
        torch.manual_seed(5)
        thought_loss = evaluate_batch(objective, batch, num_steps, best_of=1)["loss"].mean()
        assert thought_loss.item() == pytest.approx(out.metrics[f"loss_step{num_steps - 1}"].item(), rel=1e-12)
        torch.manual_seed(5)
        predicted = objective.predict(batch["tokens"][:, :-1], batch["tokens"][:, 1:], num_steps)
        assert predicted.losses[-1].item() == pytest.approx(thought_loss.item(), rel=1e-12)
