"""The per-model parallel plans name modules that exist, cover every module a pipeline stage may drop, and the
metric names the pipeline reports are the ones the objectives produce."""

import pytest
import torch
from torch import nn

from ebwm_scale.core.mcmc import MCMCConfig, loss_weights
from ebwm_scale.core.objective import ARObjective, EBTObjective, build_objective
from ebwm_scale.models import ARFrames, ARText, EBTFrames, EBTText
from ebwm_scale.parallel.pipeline import apply_pipeline
from ebwm_scale.parallel.plans import PLANS, TPStyle, plan_for
from tests.conftest import tiny_model_config

FAMILIES = {
    ("ebt", "text"): EBTText,
    ("ebt", "frames"): EBTFrames,
    ("ar", "text"): ARText,
    ("ar", "frames"): ARFrames,
}


def _objective(kind: str, modality: str, **model) -> nn.Module:
    cfg = tiny_model_config(kind, modality, step_conditioning="additive" if kind == "ebt" else "none", **model)
    return build_objective(cfg.build(), MCMCConfig(num_steps=2, alpha_init=5.0).build())


@pytest.mark.parametrize("kind, modality", FAMILIES)
def test_every_model_family_has_a_plan_whose_paths_exist(kind, modality):
    objective = _objective(kind, modality)
    assert type(objective.model) is FAMILIES[(kind, modality)]
    plan = plan_for(objective.model)
    for path, layer in plan.tp_layers(objective.model).items():
        module = objective.model.get_submodule(path)
        expected = nn.Embedding if layer.style == TPStyle.vocab_embedding else nn.Linear
        assert isinstance(module, expected), path
    for path in plan.first_stage + plan.last_stage:
        assert isinstance(objective.get_submodule(path), nn.Module), path
    for name in plan.compile_methods:
        assert callable(getattr(objective.model, name))


@pytest.mark.parametrize("kind, modality", FAMILIES)
def test_the_pipeline_cut_keeps_each_parameter_on_exactly_one_stage(kind, modality):
    """What stage 0 drops (embeddings, alpha) and what the last stage drops (norm, head) is the plan's; together the
    stages hold every parameter once, so a plan that forgot a module would show here."""
    whole = {name for name, _ in _objective(kind, modality, num_layers=3).named_parameters()}
    held = []
    for stage in range(3):
        part = _objective(kind, modality, num_layers=3)
        apply_pipeline(part, stage, 3)
        held += [name for name, _ in part.named_parameters()]
    assert sorted(held) == sorted(whole)


def test_a_model_without_a_plan_is_refused_by_name():
    class Wider(EBTText):
        pass

    with pytest.raises(TypeError, match="no parallel plan for Wider"):
        plan_for(Wider(tiny_model_config()))
    assert EBTText in PLANS


@pytest.mark.parametrize("modality", ["text", "frames"])
def test_the_metric_names_the_pipeline_reports_are_the_objectives(modality):
    mcmc = MCMCConfig(num_steps=3, alpha_init=5.0)
    frames = modality == "frames"
    ebt = build_objective(tiny_model_config("ebt", modality).build(), mcmc.build())
    ar = build_objective(tiny_model_config("ar", modality).build(), mcmc.build())
    seq = torch.randint(0, 32, (2, 6)) if not frames else torch.randn(2, 6, 8)
    batch = {"frames" if frames else "tokens": seq}
    assert list(ebt(batch).metrics) == EBTObjective.train_metric_names(mcmc)
    assert list(ebt.evaluate(batch)) == EBTObjective.eval_metric_names(frames)
    assert list(ar(batch).metrics) == ARObjective.train_metric_names()
    assert list(ar.evaluate(batch)) == ARObjective.eval_metric_names(frames)


@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_the_loss_weights_give_the_training_loss(loss_on):
    mcmc = MCMCConfig(num_steps=3, loss_on=loss_on).build()
    losses = [torch.tensor(2.0), torch.tensor(3.0), torch.tensor(7.0)]
    weighted = sum(w * loss for w, loss in zip(loss_weights(mcmc.cfg, 3), losses))
    assert torch.allclose(weighted, mcmc.train_loss(losses))
