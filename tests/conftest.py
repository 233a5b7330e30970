from pathlib import Path

import pytest
import torch

from ebwm_scale.mcmc import MCMCConfig
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import DistInfo

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_model_config(kind: str = "ebt", modality: str = "text", **overrides) -> ModelConfig:
    fields = dict(kind=kind, modality=modality, vocab_size=32, frame_dim=8, dim=32, num_layers=2, num_heads=4)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_mcmc() -> MCMCConfig:
    return MCMCConfig(num_steps=2, alpha_init=5.0)
