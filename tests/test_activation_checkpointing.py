"""Activation checkpointing (non-reentrant) under double backward: same losses and gradients as without it."""

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.dist import ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize
from tests.conftest import tiny_model_config


def _loss_and_grads(kind, modality, ebt_impl, checkpointing):
    torch.manual_seed(0)
    cfg = tiny_model_config(kind, modality, ebt_impl=ebt_impl, num_layers=3)
    objective = build_objective(cfg.build(), MCMCConfig(alpha_init=5.0, langevin_noise_std=0.1).build())
    objective = parallelize(objective, ParallelConfig(activation_checkpointing=checkpointing))
    batch = {"tokens": torch.randint(0, 32, (2, 9))} if modality == "text" else {"frames": torch.randn(2, 9, 8)}
    torch.manual_seed(1)
    out = objective(batch)
    out.loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in objective.named_parameters()}
    return objective, out.loss.item(), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize(
    "kind, modality, ebt_impl", [("ebt", "text", "split"), ("ebt", "frames", "masked"), ("ar", "text", "split")]
)
def test_checkpointing_matches_plain_backward(kind, modality, ebt_impl, mode):
    plain, loss, grads = _loss_and_grads(kind, modality, ebt_impl, "none")
    objective, loss_ckpt, grads_ckpt = _loss_and_grads(kind, modality, ebt_impl, mode)
    wrapped = [type(layer).__name__ for layer in objective.model.transformer.layers]
    assert wrapped.count("CheckpointWrapper") == (3 if mode == "full" else 2)
    assert objective.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    assert loss_ckpt == loss and grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_cannot_serve_the_energy_gradient():
    """Why parallelize uses the non-reentrant variant: the reentrant one refuses autograd.grad."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    torch.manual_seed(0)
    objective = build_objective(tiny_model_config("ebt", "text").build(), MCMCConfig(alpha_init=5.0).build())
    layers = objective.model.transformer.layers
    layers[0] = checkpoint_wrapper(layers[0], checkpoint_impl=CheckpointImpl.REENTRANT)
    with pytest.raises(RuntimeError, match=r"incompatible with \.grad\(\)"):
        objective({"tokens": torch.randint(0, 32, (2, 9))})
