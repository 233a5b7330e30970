import math

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.train.optim import OptimConfig, lr_at
from tests.conftest import tiny_model_config


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    after_warmup = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert min(after_warmup) == pytest.approx(0.1) and not any(math.isnan(x) for x in after_warmup)


def test_wsd_holds_the_lr_until_its_decay_then_falls_linearly_to_min_ratio():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert [lr_at(s, cfg, 110) for s in (10, 50, 88)] == [1.0, 1.0, 1.0]  # decay: the last 22 steps, from 88
    assert lr_at(99, cfg, 110) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    # until its own decay begins, a run's lr does not depend on its length: the point of branching
    assert [lr_at(s, cfg, 1000) for s in range(88)] == [lr_at(s, cfg, 110) for s in range(88)]


def test_decay_all_decays_every_weight_but_alpha_as_the_official_code():
    objective = build_objective(tiny_model_config().build(), MCMCConfig(num_steps=1).build())
    for decay, gains_decayed in (("matrices", False), ("all", True)):
        groups = OptimConfig(decay=decay).build(objective).param_groups
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        gains = [p for name, p in objective.named_parameters() if name.endswith("norm.weight")]
        assert gains and all((id(p) in decayed) == gains_decayed for p in gains)
        assert id(objective.mcmc.alpha) not in decayed


def test_official_init_is_xavier_normal_with_unit_embeddings():
    torch.manual_seed(0)
    for scheme in ("default", "official"):
        model = tiny_model_config(dim=64, vocab_size=512, init=scheme).build()
        linear = model.transformer.layers[0].attention.wqkv.weight
        fan_out, fan_in = linear.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform's support
        outside = (linear.abs() > bound).any().item()
        embedding_std = model.tok_embeddings.weight.std().item()
        if scheme == "official":
            assert outside and embedding_std == pytest.approx(1.0, rel=0.05)
        else:
            assert not outside and embedding_std == pytest.approx(0.02, rel=0.05)
        # official: q, k and v each a (D, D) xavier-normal matrix, as the official's separate linears
        for block in linear.chunk(3) if scheme == "official" else (linear,):
            fan_out, fan_in = block.shape
            assert block.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
