"""Launcher environments and the generated DeepSpeed config (no processes started)."""

import json
import os
import stat

import pytest

from ebwm_scale.config import load_config
from ebwm_scale.parallel.dist import _launcher_env, slurm_rendezvous
from ebwm_scale.parallel.engines.deepspeed import deepspeed_config
from tests.conftest import REPO


def test_launcher_env_reads_torchrun_then_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert _launcher_env() == (0, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _launcher_env() == (5, 1, 8)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _launcher_env() == (3, 3, 4)  # torchrun/deepspeed variables win


def test_slurm_rendezvous_uses_the_first_node_and_a_job_port(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"  # a stand-in with scontrol's output format, on PATH
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert slurm_rendezvous() == ("gpu07", str(20000 + 3456))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "other[1-2]")
    with pytest.raises(RuntimeError, match="scontrol show hostnames other"):
        slurm_rendezvous()


def _zero_cfg(*overrides):
    return load_config(REPO / "recipes" / "ci_tiny.yaml", ["parallel.data_parallel=zero", *overrides])


def _recipe_deepspeed_config(cfg, world_size: int) -> dict:
    return deepspeed_config(
        cfg.parallel,
        micro_batch_size=cfg.data.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        grad_clip=cfg.optim.grad_clip,
        world_size=world_size,
    )


def test_deepspeed_config_follows_the_recipe():
    cfg = _zero_cfg("parallel.zero_stage=2", "train.grad_accum_steps=3", "train.precision=bf16", "optim.grad_clip=0.5")
    ds = _recipe_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 16 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"]  # bf16 is the trainer's autocast over fp32 weights, as under ddp and fsdp


def test_user_deepspeed_json_adds_keys_and_conflicts_are_errors(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}))
    ds = _recipe_deepspeed_config(_zero_cfg(f"parallel.deepspeed_config={extra}"), world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "elastic_checkpoint": False, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True
    extra.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match=r"sets zero_optimization.stage=3 but the recipe implies 1"):
        _recipe_deepspeed_config(_zero_cfg(f"parallel.deepspeed_config={extra}"), world_size=2)
    extra.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"sets bf16.enabled=True .* never DeepSpeed's bf16 mode"):
        _recipe_deepspeed_config(_zero_cfg(f"parallel.deepspeed_config={extra}"), world_size=2)
