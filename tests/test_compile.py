"""torch.compile (inductor) where the EBT allows it (docs/design.md §3): what works with a second-order gradient,
what does not, and that the compiled model trains exactly like the eager one."""

import pytest
import torch
import torch._dynamo

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.slow  # inductor compiles C++ on CPU: 10-30 s per model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_and_grads(kind: str, compile: bool, checkpointing: str = "none", steps: int = 2):
    torch.manual_seed(0)
    cfg = tiny_model_config(kind, num_layers=2)
    objective = build_objective(cfg.build(), MCMCConfig(num_steps=2, alpha_init=5.0).build())
    objective = parallelize(objective, ParallelConfig(compile=compile, activation_checkpointing=checkpointing))
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.05)
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 9))}
    losses = []
    for _ in range(steps):  # the second step reuses the compiled graphs
        torch.manual_seed(1)
        loss = objective(batch).loss
        loss.backward()
        losses.append(loss.item())
        grads = {name: p.grad.clone() for name, p in objective.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads, objective


@pytest.mark.parametrize("kind, checkpointing", [("ebt", "none"), ("ebt", "full"), ("ar", "full")])
def test_compiled_model_trains_like_the_eager_one(kind, checkpointing):
    eager_losses, eager_grads, eager = _loss_and_grads(kind, False, checkpointing)
    losses, grads, compiled = _loss_and_grads(kind, True, checkpointing)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, grad in eager_grads.items():
        # fp32: inductor's fusions reorder sums, so near-zero entries are compared on the tensor's own scale
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max()), name
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_compiling_the_energy_path_fails_for_want_of_double_backward():
    """Why the EBT's prediction stream stays eager: a compiled graph's backward cannot itself be differentiated. The
    MCMC's energy gradient runs it with a graph; AOT autograd refuses that outright, or, when the incoming gradient
    (which then requires grad) needs another layout than the one traced, fails restriding it first."""
    torch.manual_seed(0)
    cfg = tiny_model_config("ebt", num_layers=1)
    objective = build_objective(cfg.build(), MCMCConfig(num_steps=1, alpha_init=5.0).build())
    for block in objective.model.transformer.layers:  # also runs the prediction rows
        block.compile(backend="aot_eager")
    refusals = (
        "does not currently support double backward|leaf Variable that requires grad is being used in an in-place"
    )
    with pytest.raises(RuntimeError, match=refusals):
        objective({"tokens": torch.randint(0, cfg.vocab_size, (2, 9))}).loss.backward()
