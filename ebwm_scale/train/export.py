"""Topology-independent export: a checkpoint's weights as one safetensors file plus the resolved config as JSON.

The export holds everything needed to rebuild the model for inference or to start a new run from its weights,
and nothing of the training topology (ranks, optimizer, data position).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import fsspec
import torch
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ebwm_scale.config import ConfigError, PretrainConfig, config_from_text
from ebwm_scale.data.shards import ShardFormatError, read_meta
from ebwm_scale.models.config import ModelConfig
from ebwm_scale.objective import build_objective
from ebwm_scale.parallel.state import checkpoint_state, load_checkpoint_state
from ebwm_scale.train.checkpoint import (
    CONFIG_FILE,
    STATE_DIR,
    TRAINER_FILE,
    Checkpointer,
    CheckpointError,
    read_sharded,
)

EXPORT_CONFIG = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"  # a text run's sentencepiece model, copied from its shards


def run_tokenizer(cfg: PretrainConfig) -> bytes | None:
    """The sentencepiece model a text run on prepared shards was trained with, checked against the shards'
    meta.json; None for byte-level text and frames."""
    if cfg.model.modality != "text" or cfg.data.source != "shards":
        return None
    url = cfg.data.shards.urls[0].rstrip("/")
    try:
        meta = read_meta(url)
        with fsspec.open(f"{url}/{TOKENIZER_FILE}", "rb") as f:
            data = f.read()
    except (OSError, ShardFormatError) as error:
        raise CheckpointError(f"cannot read the run's tokenizer from {url}: {error}") from None
    if hashlib.sha256(data).hexdigest() != meta["tokenizer"]["sha256"]:
        raise CheckpointError(f"{url}/{TOKENIZER_FILE} does not match its meta.json: not the tokenizer of the shards")
    return data


def export_checkpoint(checkpoint_url: str, out_url: str) -> None:
    cfg, objective, _ = load_checkpoint(checkpoint_url)
    tensors = {key: value.contiguous() for key, value in objective.state_dict().items()}
    fs, root = fsspec.core.url_to_fs(out_url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{MODEL_FILE}", "wb") as f:
        f.write(save_safetensors(tensors, metadata={"format": "ebwm-scale", "source": checkpoint_url}))
    tokenizer = run_tokenizer(cfg)
    if tokenizer is not None:  # so that generation needs nothing but the export
        with fs.open(f"{root}/{TOKENIZER_FILE}", "wb") as f:
            f.write(tokenizer)
    with fs.open(f"{root}/{EXPORT_CONFIG}", "w") as f:
        json.dump(OmegaConf.to_container(OmegaConf.structured(cfg)), f, indent=1)


def _read_export(url: str) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    fs, root = fsspec.core.url_to_fs(url)
    for name in (EXPORT_CONFIG, MODEL_FILE):
        if not fs.exists(f"{root}/{name}"):
            raise CheckpointError(f"{url} is not an export: {name} is missing (write one with tools/export.py)")
    with fs.open(f"{root}/{EXPORT_CONFIG}") as f:
        cfg = config_from_text(f.read().decode(), url)
    with fs.open(f"{root}/{MODEL_FILE}", "rb") as f:
        return cfg, load_safetensors(f.read())


def exported_tokenizer(url: str) -> str:
    """The path of an export's tokenizer, or "" (not an export, or one without a tokenizer)."""
    fs, root = fsspec.core.url_to_fs(url)
    return f"{url.rstrip('/')}/{TOKENIZER_FILE}" if fs.exists(f"{root}/{TOKENIZER_FILE}") else ""


def read_exported_weights(url: str, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The unsharded weights of an export, after checking they were trained with the `model` architecture (the
    attention kernel, EBT layout and RoPE base may differ: the weights mean the same under each)."""
    cfg, weights = _read_export(url)
    exported, wanted = asdict(cfg.model), asdict(model)
    for key in wanted.keys() - {"attn_impl", "ebt_impl", "rope_theta"}:
        if exported[key] != wanted[key]:
            raise ConfigError(f"train.init_from={url}: model.{key}={exported[key]!r} there, {wanted[key]!r} here")
    return weights


def load_exported(url: str, device: str | torch.device = "cpu") -> tuple[PretrainConfig, nn.Module]:
    """(config, objective with the exported weights): objective.model is the EBT/AR model, objective.mcmc its alpha."""
    cfg, weights = _read_export(url)
    objective = build_objective(cfg.model.build(), cfg.mcmc.build())
    objective.load_state_dict(weights)
    return cfg, objective.to(device)


def load_checkpoint(url: str) -> tuple[PretrainConfig, nn.Module, dict[str, Any]]:
    """(config, objective with the weights, trainer state) of a verified training checkpoint."""
    reader = Checkpointer(url, keep_last=1)
    reader.check_format(url)
    cfg = config_from_text(reader.read_verified(url, CONFIG_FILE).decode(), url)
    objective = build_objective(cfg.model.build(), cfg.mcmc.build())
    state = checkpoint_state(objective)
    read_sharded(state, f"{url}/{STATE_DIR}", collective=False)
    load_checkpoint_state(objective, None, state)
    return cfg, objective, reader.read_torch(url, TRAINER_FILE)


def load_model(url: str, latest: bool = False) -> tuple[PretrainConfig, nn.Module]:
    """(config, objective) from an export directory, a checkpoint, or (latest) the newest checkpoint of a
    checkpoint_dir."""
    if latest:
        newest = Checkpointer(url, keep_last=1).latest()
        if newest is None:
            raise CheckpointError(f"no complete checkpoint in {url}")
        url = newest
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(f"{root}/{EXPORT_CONFIG}"):
        return load_exported(url)
    cfg, objective, _ = load_checkpoint(url)
    return cfg, objective
