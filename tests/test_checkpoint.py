import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from ebwm_scale.config import ConfigError, load_config
from ebwm_scale.pretrain import build_trainer
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.checkpoint import MANIFEST, Checkpointer, CheckpointError, model_file_bytes, torch_bytes
from ebwm_scale.train.export import load_exported
from tests.conftest import CPU, REPO
from tests.test_training import SMALL, Recorder

VIDEO = [
    "data.micro_batch_size=4",
    "data.video.num_clips=64",
    "data.video.num_val_clips=8",
    "model.dim=32",
    "model.num_heads=2",
]


def _trainer(tmp_path, *overrides, recipe="ci_tiny_video.yaml", callbacks=()):
    cfg = load_config(REPO / "recipes" / recipe, [*SMALL, *VIDEO, f"train.output_dir={tmp_path}", *overrides])
    return build_trainer(cfg, CPU, list(callbacks))


def _shared(data: bytes):
    return lambda: {"model.safetensors": data, "trainer.pt": torch_bytes({"step": 1}), "config.yaml": b"x: 1"}


def test_memory_filesystem_save_latest_keep_last_and_verify():
    ckpt = Checkpointer("memory://ckpt-test/run", keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, _shared(b"weights%d" % step), torch_bytes({"rank": 0}))
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[-1] for p in ckpt.complete_checkpoints()] == ["step_00000002", "step_00000003"]
    assert ckpt.latest() == "memory://ckpt-test/run/step_00000003"
    assert ckpt.read_verified(ckpt.latest(), "model.safetensors") == b"weights3"
    with fs.open("/ckpt-test/run/step_00000003/model.safetensors", "wb") as f:
        f.write(b"weightsX")  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        ckpt.read_verified(ckpt.latest(), "model.safetensors")
    fs.rm("/ckpt-test", recursive=True)


def test_a_checkpoint_without_manifest_is_never_picked(tmp_path):
    ckpt = Checkpointer(f"file://{tmp_path}", keep_last=3)
    ckpt.save(2, _shared(b"good"), torch_bytes({}))
    crashed = tmp_path / "step_00000004"  # what a crash between the file writes and the manifest leaves
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-step_00000006").mkdir()
    assert ckpt.latest() == f"file://{tmp_path}/step_00000002"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.read_verified(str(crashed), "model.safetensors")


def test_checkpoint_loading_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    weights = model_file_bytes({"w": torch.zeros(1)})
    path = ckpt.save(1, lambda: {"model.safetensors": weights, "trainer.pt": torch_bytes({"x": Evil()})}, b"")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        ckpt.load(path)


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    trainer = _trainer(tmp_path, f"train.checkpoint_dir={blocker}/ckpts", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="is not writable"):
        trainer.fit()
    assert trainer.step == 0


class SmallDisk(LocalFileSystem):
    """`smalldisk:///dir`: the local filesystem with a capacity. A write that would take the bytes under the root
    past it fails with ENOSPC, as a full disk does (no mount privileges needed, so CI always runs it)."""

    protocol = ("smalldisk",)
    capacity = 0
    root_dir = ""

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("smalldisk://"))

    def used(self) -> int:
        return sum(f.stat().st_size for f in Path(self.root_dir).rglob("*") if f.is_file())

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        if "w" not in mode:
            return handle
        disk, write = self, handle.write

        def bounded_write(data):
            if disk.used() + len(data) > disk.capacity:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            written = write(data)
            handle.flush()  # counted at once, like blocks on a disk
            return written

        handle.write = bounded_write
        return handle


def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    probe = _trainer(tmp_path / "probe", "train.max_steps=1")
    probe.fit()
    checkpoint_bytes = sum(f.stat().st_size for f in Path(probe.checkpointer.latest()).iterdir())
    disk = tmp_path / "small_disk"
    disk.mkdir()
    fsspec.register_implementation("smalldisk", SmallDisk, clobber=True)
    SmallDisk.capacity, SmallDisk.root_dir = int(1.6 * checkpoint_bytes), str(disk)  # one checkpoint, not two
    trainer = _trainer(
        tmp_path,
        f"train.checkpoint_dir=smalldisk://{disk}",
        "train.max_steps=6",
        "train.checkpoint_interval_steps=2",
        "train.keep_last_checkpoints=5",
    )
    with pytest.raises(CheckpointError, match="No space left"):
        trainer.fit()
    assert trainer.step == 4  # the step-2 checkpoint fit, the step-4 one did not
    ckpt = Checkpointer(str(disk), keep_last=5)
    survivors = ckpt.complete_checkpoints()
    assert [name.rsplit("/", 1)[-1] for name in survivors] == ["step_00000002"]
    assert not any(p.name.startswith(".tmp") for p in disk.iterdir())  # the half-written one is gone
    _, state, _ = ckpt.load(ckpt.latest())  # verified: sizes and hashes match
    assert state["step"] == 2


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    trainer = _trainer(tmp_path, "train.max_steps=20", "train.max_bad_steps=3")
    before = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    trainer.train_loader.dataset.clips[:] = float("nan")  # corrupt every sample
    with pytest.raises(Exception, match=r"3 steps in a row .* non-finite loss"):
        trainer.fit()
    assert trainer.step == 3 and trainer.skipped_steps == 3
    assert all(torch.equal(before[k], v) for k, v in trainer.objective.state_dict().items())  # no update


def test_isolated_non_finite_steps_are_skipped_and_training_goes_on(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, "train.max_steps=16", "train.max_bad_steps=3", callbacks=[recorder])
    trainer.train_loader.dataset.clips[::8] = float("nan")  # one bad clip in eight poisons some batches
    summary = trainer.fit()
    assert summary["steps"] == 16 and 0 < summary["skipped_steps"] < 16
    assert recorder.train[-1]["skipped_steps"] == summary["skipped_steps"]
    assert all(torch.isfinite(p).all() for p in trainer.objective.parameters())


def test_fsspec_memory_checkpoint_dir_resumes(tmp_path):
    url = "memory://resume-test/ckpts"
    first = _trainer(tmp_path / "a", f"train.checkpoint_dir={url}", "train.max_steps=3")
    first.fit()
    second = _trainer(tmp_path / "b", f"train.checkpoint_dir={url}", "train.max_steps=5", "train.resume=auto")
    summary = second.fit()
    assert summary["resumed_from"] == f"{url}/step_00000003" and summary["steps"] == 5
    fsspec.filesystem("memory").rm("/resume-test", recursive=True)


def test_export_rebuilds_the_same_model(tmp_path):
    trainer = _trainer(tmp_path, "train.max_steps=2")
    trainer.fit()
    out = tmp_path / "export"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "export.py"), str(trainer.checkpointer.url), str(out), "--latest"],
        check=True,
        capture_output=True,
    )
    cfg, objective = load_exported(str(out))
    assert cfg.model == trainer.cfg.model and json.loads((out / "config.json").read_text())["train"]["max_steps"] == 2
    ctx, pred = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert torch.equal(objective.model(ctx, pred), trainer.objective.model(ctx, pred))
    assert objective.mcmc.alpha.item() == trainer.objective.mcmc.alpha.item()

    class EnergyAtStart(Callback):
        def on_train_start(self, trainer):
            self.energy = trainer.objective.model(ctx, pred)

    at_start = EnergyAtStart()
    _trainer(tmp_path / "b", f"train.init_from={out}", "train.max_steps=1", callbacks=[at_start]).fit()
    assert torch.equal(at_start.energy, objective.model(ctx, pred))  # a new run starts from the exported weights
    with pytest.raises(ConfigError, match=r"train.init_from=.*: model.dim=32 there, 48 here"):
        _trainer(tmp_path / "c", f"train.init_from={out}", "model.dim=48").fit()
    with pytest.raises(CheckpointError, match="not an export: config.json is missing"):
        _trainer(tmp_path / "d", f"train.init_from={tmp_path}").fit()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_zero(tmp_path, sig):
    cmd = [
        sys.executable,
        str(REPO / "ebwm_scale" / "pretrain.py"),
        str(REPO / "recipes" / "ci_tiny_video.yaml"),
        *SMALL,
        *VIDEO,
        "train.max_steps=100000",
        "train.log_interval_steps=1",
        f"train.output_dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "ci_tiny_video" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "ci_tiny_video" / "summary.json").read_text())
    assert summary["status"] == f"stopped by {sig.name}" and 3 <= summary["steps"] < 100000
    assert f"{sig.name}: stopped after step {summary['steps']}" in out
    latest = Checkpointer(str(tmp_path / "ci_tiny_video" / "checkpoints"), keep_last=1).latest()
    assert latest.endswith(f"step_{summary['steps']:08d}") and (Path(latest) / MANIFEST).exists()
