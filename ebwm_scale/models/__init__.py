"""Plain PyTorch models. They know nothing of parallelism, training or config files."""

from ebwm_scale.models.ar import ARFrames, ARText
from ebwm_scale.models.config import ModelConfig
from ebwm_scale.models.ebt import EBT, EBTFrames, EBTText

__all__ = ["ARFrames", "ARText", "EBT", "EBTFrames", "EBTText", "ModelConfig"]
