import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ebwm_scale.core.mcmc import MCMCConfig, ReplayConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.models.blocks import count_params
from ebwm_scale.train.metrics import (
    FlopCount,
    peak_memory_gb,
    peak_tflops,
    step_flops_per_token,
    train_flops_per_token,
)
from tests.conftest import tiny_model_config

SEQ_LEN = 16


def _real_step_flops_per_token(cfg, mcmc: MCMCConfig, batch_size: int = 2) -> float:
    """FlopCounterMode around a real CPU training step (it cannot follow the frames EBT: see metrics.py)."""
    torch.manual_seed(0)
    objective = build_objective(cfg.build(), mcmc.build())
    if cfg.modality == "text":
        batch = {"tokens": torch.randint(0, cfg.vocab_size, (batch_size, SEQ_LEN + 1))}
    else:
        batch = {"frames": torch.randn(batch_size, SEQ_LEN + 1, cfg.frame_dim)}
    with FlopCounterMode(display=False) as counter:
        objective(batch).loss.backward()
    return counter.get_total_flops() / (batch_size * SEQ_LEN)


@pytest.mark.parametrize(
    "kind, modality, conditioning, ebt_impl",
    [
        ("ar", "text", "none", "split"),
        ("ar", "frames", "none", "split"),
        ("ebt", "text", "none", "split"),
        ("ebt", "text", "time_token", "split"),
        ("ebt", "text", "additive", "masked"),
    ],
)
def test_counted_flops_are_what_flop_counter_mode_counts_in_a_real_step(kind, modality, conditioning, ebt_impl):
    cfg = tiny_model_config(kind, modality, step_conditioning=conditioning, num_step_embeddings=2, ebt_impl=ebt_impl)
    mcmc = MCMCConfig(num_steps=2, alpha_init=5.0)
    assert train_flops_per_token(cfg, mcmc, SEQ_LEN) == pytest.approx(_real_step_flops_per_token(cfg, mcmc), rel=1e-9)


def test_the_count_follows_the_mcmc_step_count_and_the_conditioning():
    """Linear in the steps actually run; a random step count counts as its expectation; the time token's context
    stream, re-run every step, is in the per-step cost."""
    cfg, tt_cfg = (tiny_model_config("ebt", step_conditioning=c, num_step_embeddings=4) for c in ("none", "time_token"))
    mcmc = MCMCConfig(num_steps=1, alpha_init=5.0)
    none = [step_flops_per_token(cfg, mcmc, SEQ_LEN, k) for k in (1, 2, 3)]
    tt = [step_flops_per_token(tt_cfg, mcmc, SEQ_LEN, k) for k in (1, 2)]
    per_step, once_per_batch = none[1] - none[0], 2 * none[0] - none[1]
    assert none[2] - none[1] == pytest.approx(per_step, rel=1e-12) and once_per_batch > 0
    assert tt[1] - tt[0] == pytest.approx(per_step + once_per_batch, rel=0.05)  # + the context stream, per step
    randomized = MCMCConfig(num_steps=1, max_num_steps=3, alpha_init=5.0)
    assert train_flops_per_token(cfg, randomized, SEQ_LEN) == pytest.approx(none[1], rel=1e-12)  # E[K] = 2


def test_a_system2_count_is_a_real_steps_with_its_repeats_truncation_and_replayed_share():
    """Repeats on one time-token landscape, only the last step differentiated: what a real step counts; drawn
    repeats count as their expectation, and replayed sequences add their share of the batch."""
    cfg = tiny_model_config("ebt", step_conditioning="time_token", num_step_embeddings=1)
    fixed = MCMCConfig(num_steps=1, steps_per_landscape=3, loss_on="last", detach_chain=False, alpha_init=5.0)
    counted = train_flops_per_token(cfg, fixed, SEQ_LEN)
    assert counted == pytest.approx(_real_step_flops_per_token(cfg, fixed), rel=1e-9)
    assert counted < train_flops_per_token(cfg, dataclasses.replace(fixed, loss_on="all"), SEQ_LEN)  # truncated
    drawn = dataclasses.replace(fixed, steps_per_landscape=2, max_steps_per_landscape=4)
    assert train_flops_per_token(cfg, drawn, SEQ_LEN) == pytest.approx(counted, rel=1e-12)  # E[repeats] = 3
    replayed = dataclasses.replace(fixed, replay=ReplayConfig(size=8, sample_fraction=0.5))
    assert train_flops_per_token(cfg, replayed, SEQ_LEN) == pytest.approx(1.5 * counted, rel=1e-12)


def test_an_ar_count_is_the_usual_6n_plus_12lds():
    cfg = tiny_model_config("ar", "text")
    non_embedding = count_params(cfg.build()) - cfg.vocab_size * cfg.dim
    usual = 6 * non_embedding + 12 * cfg.num_layers * cfg.dim * SEQ_LEN
    assert train_flops_per_token(cfg, MCMCConfig(), SEQ_LEN) == pytest.approx(usual, rel=0.01)


def test_mfu_peak_is_blank_on_cpu_unless_configured():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, 0.0) is None
    assert peak_tflops(cpu, 2.5) == 2.5
    assert 0 < peak_memory_gb(cpu) < 64


def test_an_in_place_matmul_counts_as_its_out_of_place_twin():
    """The lean vocabulary state accumulates weight gradients with addmm_, which torch's FLOP registry does not list:
    counted as addmm, never as zero."""
    acc, left, right = torch.zeros(5, 4), torch.randn(5, 3), torch.randn(3, 4)
    with FlopCount() as in_place:
        acc.addmm_(left, right)
    with FlopCount() as out_of_place:
        torch.addmm(acc, left, right)
    assert in_place.total == out_of_place.total == 2 * 5 * 3 * 4
