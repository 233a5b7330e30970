import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig, refine
from ebwm_scale.parallel.engines.base import set_lr
from ebwm_scale.train.optim import OptimConfig
from tests.helpers import frames_objective, trained_frames_objective


def _energy_fn(objective, ctx):
    return objective.energy_fn(objective.model.encode_context(ctx))


def _frames_batch(batch_size=4, seq_len=6):
    return {"frames": torch.randn(batch_size, seq_len + 1, 8)}


def test_alpha_receives_gradient_and_moves_with_its_own_lr():
    objective = frames_objective()
    optimizer = OptimConfig(lr=1e-3, warmup_steps=1).build(objective, alpha_lr_multiplier=50.0)
    set_lr(optimizer, lambda multiplier: 1e-3 * multiplier)
    alpha_group = [g for g in optimizer.param_groups if any(p is objective.mcmc.alpha for p in g["params"])]
    assert len(alpha_group) == 1 and alpha_group[0]["lr"] == 1e-3 * 50 and alpha_group[0]["weight_decay"] == 0
    out = objective(_frames_batch())
    out.loss.backward()
    assert objective.mcmc.alpha.grad is not None and objective.mcmc.alpha.grad != 0
    before = objective.mcmc.alpha.item()
    optimizer.step()
    assert abs(objective.mcmc.alpha.item() - before) > 1e-3  # Adam moves ~lr * multiplier


def test_alpha_is_clamped_to_alpha_min():
    objective = frames_objective(alpha_min=1e-3)
    with torch.no_grad():
        objective.mcmc.alpha.fill_(-2.0)
    assert objective.mcmc.step_size().item() == pytest.approx(1e-3)


def test_loss_on_all_steps_vs_last():
    batch = _frames_batch()
    torch.manual_seed(1)
    out_all = frames_objective(loss_on="all")(batch)
    torch.manual_seed(1)
    out_last = frames_objective(loss_on="last")(batch)
    steps = [out_all.metrics["loss_step0"], out_all.metrics["loss_step1"]]
    assert torch.allclose(out_all.loss, torch.stack(steps).mean())
    assert torch.allclose(out_last.loss, steps[1])


def test_randomized_step_count_stays_in_range_and_varies():
    mcmc = MCMCConfig(num_steps=2, max_num_steps=4).build()
    torch.manual_seed(0)
    counts = {mcmc.sample_num_steps() for _ in range(50)}
    assert counts == {2, 3, 4}


def test_langevin_noise_and_jitter_change_the_chain():
    objective = frames_objective()
    ctx = torch.randn(2, 5, 8)
    init = torch.randn(2, 5, 8)

    def run(**options):
        torch.manual_seed(3)
        return refine(
            _energy_fn(objective, ctx), objective.space, init, torch.tensor(5.0), 3, create_graph=False, **options
        )

    plain = run()
    assert torch.equal(plain.pred, run().pred)  # deterministic without noise
    assert not torch.allclose(plain.pred, run(langevin_noise_std=0.1).pred)
    assert not torch.allclose(plain.pred, run(alpha_jitter=0.5).pred)


def test_refine_runs_under_no_grad_and_returns_detached_state():
    objective = frames_objective()
    ctx = torch.randn(2, 5, 8)
    with torch.no_grad():
        result = refine(
            _energy_fn(objective, ctx), objective.space, torch.randn(2, 5, 8), torch.tensor(1.0), 3, create_graph=False
        )
    assert len(result.energies) == 3 and not result.pred.requires_grad


@pytest.mark.slow
def test_more_inference_steps_than_training_lower_the_energy():
    """Train a tiny frames EBT briefly (2 MCMC steps), then think longer: energy keeps going down."""
    objective, frames = trained_frames_objective()
    ctx = frames[:, :-1]
    energy_fn = _energy_fn(objective, ctx)
    init = torch.randn(8, 6, 8)
    alpha = objective.mcmc.step_size().detach()
    final_energy = {}
    for num_steps in (2, 8):
        result = refine(energy_fn, objective.space, init, alpha, num_steps, create_graph=False, final_energy=True)
        final_energy[num_steps] = result.final_energy.mean().item()
    trace = refine(energy_fn, objective.space, init, alpha, 8, create_graph=False).energies
    assert final_energy[8] < final_energy[2]
    assert trace[-1].mean() < trace[1].mean()
