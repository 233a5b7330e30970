import pytest
import torch

from ebwm_scale.models.blocks import count_params
from ebwm_scale.train.metrics import (
    EBT_STEP_FLOPS_OVER_AR,
    peak_memory_gb,
    peak_tflops,
    train_flops_per_token,
)
from tests.conftest import tiny_model_config


def test_flop_formula_is_the_pinned_one():
    cfg = tiny_model_config("ar", "text")
    model = cfg.build()
    non_embedding = count_params(model) - cfg.vocab_size * cfg.dim
    expected_ar = 6 * non_embedding + 12 * cfg.num_layers * cfg.dim * 16
    assert train_flops_per_token(model, cfg, seq_len=16, num_mcmc_steps=2) == expected_ar
    ebt_cfg = tiny_model_config("ebt", "text")
    ebt = ebt_cfg.build()
    ebt_ar_equivalent = 6 * (count_params(ebt) - cfg.vocab_size * cfg.dim) + 12 * cfg.num_layers * cfg.dim * 16
    assert train_flops_per_token(ebt, ebt_cfg, 16, 3) == pytest.approx(3 * EBT_STEP_FLOPS_OVER_AR * ebt_ar_equivalent)


def test_mfu_peak_is_blank_on_cpu_unless_configured():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, 0.0) is None
    assert peak_tflops(cpu, 2.5) == 2.5
    assert 0 < peak_memory_gb(cpu) < 64
