import math

import pytest

from ebwm_scale.train.optim import OptimConfig, lr_at


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
