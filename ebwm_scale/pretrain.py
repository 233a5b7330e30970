"""Entry point: `python ebwm_scale/pretrain.py RECIPE [key.sub=value ...]`; also ebwm-pretrain, torchrun, deepspeed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import torch

from ebwm_scale.cli.recipe_help import help_text
from ebwm_scale.config import ConfigError, PretrainConfig, load_config, missing_extra
from ebwm_scale.core.objective import build_objective
from ebwm_scale.errors import run_cli
from ebwm_scale.inference.export import read_exported_weights
from ebwm_scale.logs import setup_logging
from ebwm_scale.parallel.dist import DistInfo, init_distributed, shutdown_distributed
from ebwm_scale.parallel.parallelize import parallelize, vocab_split
from ebwm_scale.train.callbacks import Callback, ConsoleCallback, MetricsFileCallback
from ebwm_scale.train.checkpoint import CheckpointCallback
from ebwm_scale.train.tracking import MLflowCallback
from ebwm_scale.train.trainer import Trainer

USAGE = (
    "usage: ebwm-pretrain RECIPE.yaml [key.sub=value ...]   (e.g. recipes/ci_tiny.yaml train.max_steps=50)\n"
    "       ebwm-pretrain --print-config RECIPE.yaml [key.sub=value ...]   (the resolved recipe, checked; no run)"
)


def build_trainer(cfg: PretrainConfig, dist: DistInfo, extra_callbacks: Sequence[Callback] = ()) -> Trainer:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    objective = build_objective(cfg.model.build(), cfg.mcmc.build(), vocab_split(dist))
    objective = parallelize(objective, cfg.parallel, dist)
    objective = objective.to(dist.device)
    torch.manual_seed(cfg.train.seed + 1 + dist.dp_rank)  # MCMC noise: per data-parallel rank, shared within TP
    train_set, val_set, data_info = cfg.data.build_datasets(cfg.model)
    callbacks = [
        ConsoleCallback(dist.is_rank0, cfg.train.log_interval_steps, cfg.train.progress_bar),
        MetricsFileCallback(dist.is_rank0),
    ]
    if cfg.tracking.enabled:
        callbacks.append(MLflowCallback(cfg.tracking, dist.is_rank0, cfg.train.log_interval_steps))
    # Last: a step's metrics are recorded before its checkpoint exists, so a kill right after the save loses none.
    callbacks.append(CheckpointCallback(cfg.train.checkpoint_interval_steps, tuple(cfg.train.checkpoint_at_steps)))
    init = cfg.train.init_from
    initial_weights = partial(read_exported_weights, init, cfg.model) if init else None
    return Trainer(cfg, objective, train_set, val_set, data_info, dist, [*callbacks, *extra_callbacks], initial_weights)


def main(argv: list[str]) -> dict:
    """Train the recipe argv[0] with overrides argv[1:]; returns the run summary."""
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's; LOCAL_RANK is set too
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(PretrainConfig, USAGE) if argv else USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] == "--print-config":
        if len(argv) < 2:
            sys.exit(USAGE)
        print(load_config(argv[1], argv[2:]).to_yaml(), end="")
        sys.exit(0)
    cfg = load_config(argv[0], argv[1:])
    problem = missing_extra(cfg)
    if problem:
        raise ConfigError(problem)
    dist = init_distributed(cfg.parallel, cfg.train.device)
    setup_logging(dist.rank, cfg.train.log_all_ranks)
    try:
        summary = build_trainer(cfg, dist).fit()
    except BaseException:
        shutdown_distributed(clean_exit=False)
        raise
    shutdown_distributed()
    return summary


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
