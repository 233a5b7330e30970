"""Checkpoints are resharded on load: a run saved under one parallel layout resumes under another (data-parallel
2 -> 1 and 2 -> 4 ranks, tensor-parallel 2 -> 1 and 1 -> 2, FSDP 2 -> 4, ZeRO-1 x TP 2 x 2 -> 1, 1 -> ZeRO-1 on 2,
FSDP x TP 2 x 2 -> 1, FSDP 2 -> FSDP x TP 2 x 2). What must be exact is exact: the resumed
run, saving at once, writes a checkpoint whose model and optimizer state equal the original bit for bit. The loss
curve then continues within the fp32 tolerance of reordered sums (same global batch, same samples, noise-free
MCMC start), and the token count continues from the checkpoint's. One saved run writes asynchronously (its own gloo
group for DCP's background exchange)."""

import json
from pathlib import Path

import pytest
import torch

from ebwm_scale.config import load_config
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.checkpoint_form import checkpoint_state
from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
from ebwm_scale.pretrain import build_trainer
from ebwm_scale.train.checkpoint import STATE_DIR, CheckpointError, read_sharded
from tests.conftest import REPO
from tests.distributed import TRAINER_LOSS_RTOL, run_distributed_test
from tests.helpers import NOISE_FREE, Recorder

GLOBAL_BATCH = 8
# NOISE_FREE: no start noise, so a re-seeded random stream changes nothing
COMMON = [*NOISE_FREE, "optim.grad_clip=0", "train.checkpoint_interval_steps=4", "train.max_steps=6"]


def _layout_overrides(layout: dict) -> list[str]:
    data_parallel_ranks = layout["world"] // layout.get("tp", 1)
    mode = layout.get("mode", "ddp")
    return [
        f"parallel.data_parallel={'ddp' if mode == 'zero1' else mode}",
        f"parallel.shard_optimizer={mode == 'zero1'}",
        f"parallel.tensor_parallel={layout.get('tp', 1)}",
        f"data.micro_batch_size={GLOBAL_BATCH // data_parallel_ranks}",
        f"train.checkpoint_async={layout.get('async', False)}",
    ]


def _dist(rank: int, world: int, tp: int) -> DistInfo:
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    return with_parallel_groups(info, tp) if tp > 1 else info


def _phase(rank: int, world: int, layout: dict, out: str, resume: str) -> None:
    """Train ci_tiny under `layout` (resuming from `resume` if given, and then saving at once into its own
    checkpoint dir); rank 0 writes the per-step losses and the summary to out/result.json."""
    overrides = [*COMMON, *_layout_overrides(layout), *layout.get("extra", []), f"train.output_dir={out}"]
    cfg = load_config(REPO / "recipes" / "ci_tiny.yaml", overrides)
    recorder = Recorder()
    trainer = build_trainer(cfg, _dist(rank, world, layout.get("tp", 1)), [recorder])
    if resume:
        trainer.resume(resume)
        trainer.save_checkpoint()
        trainer.cfg.train.resume = "auto"  # fit() resumes from that copy, as a restarted job would
    summary = trainer.fit()
    if rank == 0:
        result = {"losses": [m["loss"] for m in recorder.train], "tokens": summary["tokens"], "steps": summary["steps"]}
        Path(out, "result.json").write_text(json.dumps(result))


def _run_phase(layout: dict, out: Path, resume: str = "") -> dict:
    if layout["world"] == 1:
        _phase(0, 1, layout, str(out), resume)
    else:
        run_distributed_test(_phase, world_size=layout["world"], args=(layout, str(out), resume))
    return json.loads((out / "result.json").read_text())


def _full_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and optimizer state, read whole by one process."""
    cfg = load_config(REPO / "recipes" / "ci_tiny.yaml", COMMON)
    objective = build_objective(cfg.model.build(), cfg.mcmc.build())
    optimizer = cfg.optim.build(objective, cfg.mcmc.alpha_lr_multiplier)
    state = checkpoint_state(objective, optimizer)
    read_sharded(state, str(checkpoint / STATE_DIR), collective=False)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for key, moments in state["optim"].items():
        flat.update({f"optim.{key}.{name}": value for name, value in moments.items()})
    return flat


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, resumed",
    [
        ({"world": 2}, {"world": 1}),
        ({"world": 2}, {"world": 4}),
        ({"world": 2, "tp": 2}, {"world": 1}),
        ({"world": 1}, {"world": 2, "tp": 2}),
        ({"world": 2, "mode": "fsdp"}, {"world": 4, "mode": "fsdp"}),
        ({"world": 2, "async": True}, {"world": 1}),
        ({"world": 4, "tp": 2, "mode": "zero1"}, {"world": 1}),
        ({"world": 1}, {"world": 2, "mode": "zero1"}),
        ({"world": 4, "tp": 2, "mode": "fsdp"}, {"world": 1}),
        ({"world": 2, "mode": "fsdp"}, {"world": 4, "tp": 2, "mode": "fsdp"}),
    ],
    ids=[
        *("dp2-dp1", "dp2-dp4", "tp2-tp1", "tp1-tp2", "fsdp2-fsdp4", "dp2-async-dp1"),
        *("zero1tp2-dp1", "dp1-zero1", "fsdp2tp2-dp1", "fsdp2-fsdp2tp2"),
    ],
)
def test_a_checkpoint_resumes_under_another_layout(tmp_path, saved, resumed):
    straight = _run_phase(saved, tmp_path / "saved")
    checkpoint = tmp_path / "saved" / "ci_tiny" / "checkpoints" / "step_00000004"
    continued = _run_phase(resumed, tmp_path / "resumed", str(checkpoint))

    original, copy = (
        _full_state(checkpoint),
        _full_state(tmp_path / "resumed" / "ci_tiny" / "checkpoints" / "step_00000004"),
    )
    assert original.keys() == copy.keys() and any(".exp_avg" in key for key in original)
    for key, value in original.items():
        assert torch.equal(copy[key], value), key

    assert continued["steps"] == straight["steps"] == 6 and continued["tokens"] == straight["tokens"]
    assert continued["losses"] == pytest.approx(straight["losses"][4:], rel=TRAINER_LOSS_RTOL)


@pytest.mark.slow
def test_a_replay_buffer_resumes_only_on_its_layout(tmp_path):
    """System-2's replay buffer is rank-local state: another data-parallel size is a one-line error."""
    replay = {"extra": ["mcmc.replay.size=4"]}
    _run_phase({"world": 2, **replay}, tmp_path / "saved")
    checkpoint = tmp_path / "saved" / "ci_tiny" / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match="mcmc.replay resumes only on the same layout"):
        _phase(0, 1, {"world": 1, **replay}, str(tmp_path / "resumed"), str(checkpoint))


def _check_node_local_dirs(rank: int, world: int, root: str) -> None:
    from ebwm_scale.train.checkpoint import Checkpointer, CheckpointError

    Checkpointer(f"{root}/shared", keep_last=1, rank=rank, world_size=world).check_writable()
    node_local = Checkpointer(f"{root}/node{rank}", keep_last=1, rank=rank, world_size=world)  # as on two nodes
    with pytest.raises(CheckpointError, match="not the same directory on every rank"):
        node_local.check_writable()


@pytest.mark.slow
def test_a_checkpoint_dir_the_ranks_do_not_share_fails_at_start(tmp_path):
    """A relative or node-local train.checkpoint_dir on a multi-node job: each node would write its own half of
    every checkpoint. Two ranks given two directories stand for two nodes."""
    run_distributed_test(_check_node_local_dirs, world_size=2, args=(str(tmp_path),))
