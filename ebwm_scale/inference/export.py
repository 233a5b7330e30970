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
from ebwm_scale.core.objective import build_objective
from ebwm_scale.data.shards import ShardFormatError, read_meta
from ebwm_scale.models.config import ModelConfig
from ebwm_scale.parallel.checkpoint_form import checkpoint_state, load_checkpoint_state
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
EXPORT_MANIFEST = "export.json"  # sha256 of every other file, written last: a damaged or partial export is refused


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
    files = {
        MODEL_FILE: save_safetensors(tensors, metadata={"format": "ebwm-scale", "source": checkpoint_url}),
        EXPORT_CONFIG: json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), indent=1).encode(),
    }
    tokenizer = run_tokenizer(cfg)
    if tokenizer is not None:  # so that generation needs nothing but the export
        files[TOKENIZER_FILE] = tokenizer
    fs, root = fsspec.core.url_to_fs(out_url)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{EXPORT_MANIFEST}"):
        fs.rm(f"{root}/{EXPORT_MANIFEST}")  # an export being rewritten is not a valid export meanwhile
    for name, data in files.items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(data)
    manifest = {"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    with fs.open(f"{root}/{EXPORT_MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1)


def read_export_file(url: str, name: str) -> bytes:
    """A file of an export, checked against the export's manifest (sha256)."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        with fs.open(f"{root}/{EXPORT_MANIFEST}") as f:
            expected = json.loads(f.read())["files"]
        with fs.open(f"{root}/{name}", "rb") as f:
            data = f.read()
    except FileNotFoundError as missing:
        raise CheckpointError(f"{url} is not a complete export: {missing.filename or name} is missing") from None
    if name not in expected or hashlib.sha256(data).hexdigest() != expected[name]:
        raise CheckpointError(f"{url}/{name} does not match {EXPORT_MANIFEST} (damaged or replaced): export again")
    return data


def _read_export(url: str) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/{EXPORT_CONFIG}"):
        raise CheckpointError(f"{url} is not an export: {EXPORT_CONFIG} is missing (write one with tools/export.py)")
    cfg = config_from_text(read_export_file(url, EXPORT_CONFIG).decode(), url)
    return cfg, load_safetensors(read_export_file(url, MODEL_FILE))


def exported_tokenizer(url: str) -> bytes | None:
    """An export's tokenizer, checked against its manifest; None when `url` is no export or has no tokenizer."""
    fs, root = fsspec.core.url_to_fs(url)
    return read_export_file(url, TOKENIZER_FILE) if fs.exists(f"{root}/{TOKENIZER_FILE}") else None


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
