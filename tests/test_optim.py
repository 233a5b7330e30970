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
