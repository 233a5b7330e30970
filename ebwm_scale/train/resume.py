"""Resuming a run: which recipe changes a resumed run may make, and the check that refuses the others.

A resumed run may change how it is run, logged, checkpointed and laid out, never what a step computes (model, MCMC,
data, optimizer, seed, precision, global batch): that would mix two recipes in one run.
"""

from __future__ import annotations

import json
import math
from typing import cast

from omegaconf import OmegaConf

from ebwm_scale.logs import log
from ebwm_scale.schema import flatten
from ebwm_scale.train.checkpoint import CheckpointError

# What a resumed run may change: how it is run, logged, checkpointed and laid out, not what a step computes. The
# per-rank batch (micro-batch, accumulation) follows the ranks; the global batch it makes must stay the same.
RESUME_MAY_CHANGE = (
    "train.max_steps",
    "train.log_interval_steps",
    "train.eval_interval_steps",
    "train.eval_batches",
    "train.device",
    "train.output_dir",
    "train.run_name",
    "train.progress_bar",
    "train.log_all_ranks",
    "train.checkpoint_dir",
    "train.checkpoint_interval_steps",
    "train.keep_last_checkpoints",
    "train.checkpoint_at_steps",
    "train.checkpoint_async",
    "train.resume",
    "train.resume_allow_changes",
    "train.branch_from",
    "train.init_from",
    "train.max_bad_steps",
    "train.peak_tflops",
    "data.shards.num_workers",
    "data.shards.read_attempts",
    "data.shards.read_backoff_s",
    "tracking.",
    "parallel.",
)
PER_RANK_BATCH = ("data.micro_batch_size", "train.grad_accum_steps")
GLOBAL_BATCH = "global_batch"  # samples per optimizer step, over all data-parallel ranks


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or any(p.endswith(".") and key.startswith(p) for p in RESUME_MAY_CHANGE)


def _comparable(value: object) -> object:
    return json.loads(json.dumps(value, default=str))  # tuples and lists, OmegaConf and dataclass values alike


def recipe_changes(saved_yaml: str, saved_dp_size: int, cfg, dp_size: int) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's)} for every recipe key that a resumed run changes and should not (keys
    added or removed since the checkpoint aside), with the global batch as GLOBAL_BATCH."""
    saved = flatten(cast(dict, OmegaConf.to_container(OmegaConf.create(saved_yaml))))
    now = cfg.flat()
    changes = {
        key: (saved[key], value)
        for key, value in now.items()
        if key in saved
        and not _may_change(key)
        and key not in PER_RANK_BATCH
        and _comparable(saved[key]) != _comparable(value)
    }
    saved_batch = math.prod(cast(int, saved.get(key, now[key])) for key in PER_RANK_BATCH) * saved_dp_size
    batch_now = math.prod(cast(int, now[key]) for key in PER_RANK_BATCH) * dp_size
    if saved_batch != batch_now:
        changes[GLOBAL_BATCH] = (saved_batch, batch_now)
    return changes


def check_recipe(url: str, saved_yaml: str, saved_dp_size: int, cfg, dp_size: int) -> None:
    """Refuse a resume whose recipe computes differently from the checkpoint's, unless the keys are allowed
    (train.resume_allow_changes); allowed changes are logged."""
    changes = recipe_changes(saved_yaml, saved_dp_size, cfg, dp_size)
    described = {key: f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()}
    refused = [key for key in changes if key not in cfg.train.resume_allow_changes]
    if refused:
        raise CheckpointError(
            f"{url} was saved under another recipe ({'; '.join(described[key] for key in refused)}): resuming "
            "would mix the two in one run; start a new run (another train.run_name or train.output_dir), or "
            f"allow it with train.resume_allow_changes=[{','.join(refused)}]"
        )
    if described:
        allowed = "; ".join(described.values())
        log.warning(f"resuming {url} with changes allowed by train.resume_allow_changes: {allowed}")
