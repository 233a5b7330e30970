"""The lean vocabulary kernels (core/vocab_kernels.py) compute exactly what plain autograd does, under both update
rules and to second order, while keeping fewer B x S x V tensors alive."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from ebwm_scale.core import vocab_kernels
from ebwm_scale.core.buffers import BufferPool
from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.core.vocab_kernels import (
    cross_entropy_and_probabilities,
    lean_cross_entropy,
    probs_descent,
    probs_linear,
    softmax_linear,
)
from ebwm_scale.numerics import at_least_fp32
from tests.conftest import tiny_model_config


@pytest.fixture(params=[False, True], ids=["one-chunk", "row-chunks"])
def chunking(request, monkeypatch):
    if request.param:  # two rows per chunk, so every loop runs several chunks and a short last one
        monkeypatch.setattr(vocab_kernels, "CHUNK_ELEMENTS", 2 * 7)


def test_softmax_linear_first_and_second_derivatives(chunking):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(softmax_linear, (logits, weight))
    assert gradgradcheck(softmax_linear, (logits, weight))
    expected = torch.softmax(logits, -1) @ weight.t()
    assert torch.allclose(softmax_linear(logits, weight), expected, rtol=1e-12, atol=1e-12)


def test_probability_mapping_and_descent_first_derivatives(chunking):
    """The probs rule differentiates these once (the outer backward); gradcheck against finite differences."""
    probs = torch.softmax(torch.randn(2, 3, 7, dtype=torch.float64), -1).requires_grad_()
    energy_grad = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(probs_linear, (probs, weight))
    assert gradcheck(probs_descent, (probs, energy_grad, weight, alpha))
    expected = probs - alpha * (energy_grad @ weight)
    assert torch.allclose(probs_descent(probs, energy_grad, weight, alpha), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="second derivative of the probability-space step"):
        torch.autograd.grad(probs_descent(probs, energy_grad, weight, alpha).sum(), alpha, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative of the probability state mapping"):
        torch.autograd.grad(probs_linear(probs, weight).sum(), weight, create_graph=True)


def test_third_derivative_is_refused_clearly():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(softmax_linear(logits, weight).pow(2).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative .* use mcmc.vocab_state=plain"):
        torch.autograd.grad(grad.pow(2).sum(), weight, create_graph=True)
    logits_cross = torch.randn(3, 7, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivative of the cross-entropy"):
        torch.autograd.grad(
            lean_cross_entropy(logits_cross, torch.zeros(3, dtype=torch.long)), logits_cross, create_graph=True
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lean_cross_entropy_matches_torch(chunking, dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(6, 7)).to(dtype).requires_grad_()
    target = torch.randint(0, 7, (6,))
    lean = lean_cross_entropy(logits, target)
    (lean_grad,) = torch.autograd.grad(2 * lean, logits)
    reference = F.cross_entropy(logits.double(), target)
    (reference_grad,) = torch.autograd.grad(2 * reference, logits)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert lean.item() == pytest.approx(reference.item(), rel=tolerance)
    assert lean_grad.dtype == dtype
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(lean_grad.double(), reference_grad.double(), rtol=rtol, atol=rtol / 10)
    # the variant that keeps, and returns, the softmax instead of the logits
    kept, probs = cross_entropy_and_probabilities(logits, target)
    (kept_grad,) = torch.autograd.grad(2 * kept, logits)
    assert kept.item() == lean.item() and probs.dtype == at_least_fp32(logits).dtype and not probs.requires_grad
    assert torch.allclose(probs.double(), torch.softmax(logits.double(), -1), rtol=tolerance, atol=tolerance)
    assert torch.allclose(kept_grad.double(), reference_grad.double(), rtol=rtol, atol=rtol / 10)


def _objective(vocab_state_impl: str, vocab_size: int = 61, **mcmc):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=vocab_size)
    mcmc = {"alpha_init": 5.0, **mcmc}
    return build_objective(cfg.build(), MCMCConfig(vocab_state=vocab_state_impl, **mcmc).build())


def _step(objective, batch, seed: int = 1):
    torch.manual_seed(seed)  # the same start noise, Langevin noise and jitter for both
    out = objective(batch)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in objective.named_parameters()}


@pytest.mark.parametrize("update_space", ["probs", "logits"])
@pytest.mark.parametrize(
    "mcmc",
    [
        dict(num_steps=3),
        dict(num_steps=2, langevin_noise_std=0.3, alpha_jitter=0.5, loss_on="last"),
        # System-2: a step size per position, and an undetached chain, truncated or whole
        dict(num_steps=1, steps_per_landscape=3, step_size_scale=2.0, langevin_noise_std=0.3, detach_chain=False),
        dict(num_steps=2, step_size_scale=2.0, langevin_noise_std=0.3, detach_chain=False, loss_on="last"),
    ],
)
def test_lean_training_step_equals_plain_in_float64(chunking, mcmc, update_space):
    lean = _objective("lean", update_space=update_space, **mcmc).double()
    plain = _objective("plain", update_space=update_space, **mcmc).double()
    batch = {"tokens": torch.randint(0, 61, (3, 11))}
    lean_loss, lean_grads = _step(lean, batch)
    plain_loss, plain_grads = _step(plain, batch)
    assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-12)
    assert lean_grads.keys() == plain_grads.keys() and "mcmc.alpha" in lean_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(lean_grads[name], grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("update_space", ["probs", "logits"])
def test_state_stays_fp32_under_bf16_autocast(update_space):
    lean = _objective("lean", num_steps=2, update_space=update_space, alpha_init=0.5)
    plain = _objective("plain", num_steps=2, update_space=update_space, alpha_init=0.5)
    batch = {"tokens": torch.randint(0, 61, (2, 9))}
    losses = []
    for objective in (lean, plain):
        ctx, target = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = objective.predict(ctx, target)
        assert result.pred.dtype == torch.float32
        losses.append(result.losses[-1].item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


@pytest.mark.parametrize("update_space", ["probs", "logits"])
def test_the_training_chain_keeps_an_fp32_state_under_bf16_autocast(update_space):
    """The training step (second-order graph kept) refines an fp32 state at every MCMC step."""
    objective = _objective("lean", num_steps=2, update_space=update_space, alpha_init=0.5)
    point, seen = objective.space.point, []

    def recording_point(state, keep_graph=False, noise_std=0.0):
        seen.append(state.dtype)
        return point(state, keep_graph, noise_std)

    objective.space.point = recording_point
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective({"tokens": torch.randint(0, 61, (2, 9))}).loss
    loss.backward()
    assert seen == [torch.float32, torch.float32] and torch.isfinite(loss)
    assert objective.mcmc.alpha.grad is not None and torch.isfinite(objective.mcmc.alpha.grad)


def _state_sized_tensors_saved(objective, batch, state_numel: int) -> int:
    storages = set()

    def pack(tensor):
        if tensor.numel() >= state_numel:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        objective(batch).loss.backward()
    return len(storages)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_lean_state_keeps_the_fewest_state_tensors(num_steps):
    """The B x S x V tensors the lean state saves. probs: the start's probabilities, then per step the softmax of the
    new state, which its loss needs and which is the next step's probabilities: K + 1. logits: per step the logits
    (shared with the previous step's output) and the energy gradient (for alpha's gradient), plus the start noise:
    2K + 1. Plain autograd keeps at least 3 (probs) or 4 (logits) per step."""
    vocab_size = 509  # B x S x V then outsizes every other saved tensor (attention scores, weights, FFN)
    batch = {"tokens": torch.randint(0, vocab_size, (4, 17))}
    for update_space, lean_count, plain_at_least in (("probs", num_steps + 1, 3), ("logits", 2 * num_steps + 1, 4)):
        lean, plain = (
            _state_sized_tensors_saved(
                _objective(impl, vocab_size, num_steps=num_steps, update_space=update_space),
                batch,
                4 * 16 * vocab_size,
            )
            for impl in ("lean", "plain")
        )
        assert lean == lean_count, update_space
        assert plain >= plain_at_least * num_steps, update_space


def test_buffer_pool_hands_out_a_storage_again_only_once_nothing_else_holds_it():
    pool = BufferPool()
    first = pool.empty((4, 8), torch.float32, torch.device("cpu"))
    pointer = first.untyped_storage().data_ptr()
    view = first[1:]
    del first
    assert pool.empty((4, 8), torch.float32, "cpu").untyped_storage().data_ptr() != pointer  # the view holds it
    del view
    weight = torch.randn(8, requires_grad=True)
    saved = pool.empty((4, 8), torch.float32, "cpu").fill_(1.0)
    assert saved.untyped_storage().data_ptr() == pointer  # free again: reused
    loss = (saved * weight).sum()  # autograd saves `saved` for weight's gradient
    del saved
    assert pool.empty((4, 8), torch.float32, "cpu").untyped_storage().data_ptr() != pointer
    loss.backward()  # frees the graph, and with it the saved tensor
    assert torch.equal(weight.grad, torch.full((8,), 4.0))
    reused = pool.empty((2, 16), torch.float32, "cpu")  # same bytes, another shape and the same storage
    assert reused.untyped_storage().data_ptr() == pointer and reused.shape == (2, 16)
    del reused
    held = pool.nbytes()
    pool.empty((3, 3), torch.float64, "cpu")  # a new size; the others were asked for recently: they stay
    assert pool.nbytes() == held + 72
    pool.idle_requests = 1
    pool.empty((5, 5), torch.float64, "cpu")  # the 4 x 8 storages have been idle for more than one request
    assert pool.nbytes() == 72 + 200


@pytest.mark.parametrize("update_space", ["probs", "logits"])
@pytest.mark.parametrize("mcmc", [dict(num_steps=3), dict(num_steps=2, step_size_scale=2.0, detach_chain=False)])
def test_lean_training_steps_reuse_their_buffers_and_stay_exact(mcmc, update_space):
    """Three training steps with AdamW in float64: the lean state's B x S x V tensors come from the state space's
    buffers, the same storages every step after the first, and every loss and gradient equals plain autograd's."""
    lean = _objective("lean", update_space=update_space, **mcmc).double()
    plain = _objective("plain", update_space=update_space, **mcmc).double()
    batch = {"tokens": torch.randint(0, 61, (3, 11))}
    optimizers = [torch.optim.AdamW(objective.parameters(), lr=1e-2) for objective in (lean, plain)]
    pool_storages = []
    for seed in range(3):
        results = []
        for objective, optimizer in zip((lean, plain), optimizers, strict=True):
            results.append(_step(objective, batch, seed))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        (lean_loss, lean_grads), (plain_loss, plain_grads) = results
        assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-12)
        for name, grad in plain_grads.items():
            assert torch.allclose(lean_grads[name], grad, rtol=1e-9, atol=1e-12), name
        pool_storages.append({storage.data_ptr() for storage in lean.space.buffers._storages})
    assert len(pool_storages[0]) >= 3 and pool_storages[0] == pool_storages[1] == pool_storages[2]
