import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from ebwm_scale.config import ConfigError, load_config
from ebwm_scale.inference.export import load_checkpoint, load_exported
from ebwm_scale.pretrain import build_trainer
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.checkpoint import (
    MANIFEST,
    STATE_DIR,
    Checkpointer,
    CheckpointError,
    read_sharded,
    torch_bytes,
)
from tests.conftest import CPU, REPO
from tests.helpers import SMALL, Recorder, train_records

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
    return lambda: {"weights.bin": data, "trainer.pt": torch_bytes({"step": 1}), "config.yaml": b"x: 1"}


def test_memory_filesystem_save_latest_keep_last_and_verify():
    ckpt = Checkpointer("memory://ckpt-test/run", keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, _shared(b"weights%d" % step), torch_bytes({"rank": 0}))
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[-1] for p in ckpt.complete_checkpoints()] == ["step_00000002", "step_00000003"]
    assert ckpt.latest() == "memory://ckpt-test/run/step_00000003"
    assert ckpt.read_verified(ckpt.latest(), "weights.bin") == b"weights3"
    with fs.open("/ckpt-test/run/step_00000003/weights.bin", "wb") as f:
        f.write(b"weightsX")  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        ckpt.read_verified(ckpt.latest(), "weights.bin")
    fs.rm("/ckpt-test", recursive=True)


def test_a_checkpoint_without_manifest_is_never_picked(tmp_path):
    ckpt = Checkpointer(f"file://{tmp_path}", keep_last=3)
    ckpt.save(2, _shared(b"good"), torch_bytes({}))
    crashed = tmp_path / "step_00000004"  # what a crash between the file writes and the manifest leaves
    crashed.mkdir()
    (crashed / "weights.bin").write_bytes(b"half")
    (tmp_path / ".tmp-step_00000006").mkdir()
    assert ckpt.latest() == f"file://{tmp_path}/step_00000002"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.read_verified(str(crashed), "weights.bin")


def test_latest_checks_sizes_against_the_manifest_and_falls_back(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=3)
    ckpt.save(2, _shared(b"good"), torch_bytes({}))
    ckpt.save(4, _shared(b"newer"), torch_bytes({}))
    (tmp_path / "step_00000004" / "weights.bin").write_bytes(b"new")  # a partial copy: manifest, short file
    with pytest.warns(UserWarning, match="step_00000004 passed over: weights.bin has 3 bytes, its manifest says 5"):
        assert ckpt.latest() == f"{tmp_path}/step_00000002"
    (tmp_path / "step_00000002" / "trainer.pt").unlink()
    (tmp_path / "step_00000004" / "COMPLETE.json").unlink()
    with pytest.warns(UserWarning, match="step_00000002 passed over: trainer.pt is missing"):
        assert ckpt.latest() is None


class CopyThenDelete(LocalFileSystem):
    """`copydelete:///dir`: local files that move and vanish as on an object store: fsspec's generic mv copies every
    file, then deletes the source (the manifest, sorted first, lands first), and rm deletes file by file, so a crash
    mid-move or mid-removal leaves part of a directory."""

    protocol = ("copydelete",)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("copydelete://"))

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        return AbstractFileSystem.mv(self, path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        for file_path in sorted(self.find(path)) if recursive else [path]:
            self.rm_file(file_path)
        if recursive:
            super().rm(path, recursive=True)  # the now empty directories


class SimulatedCrash(BaseException):
    """Raised where an in-memory store cannot be SIGKILLed: no `except OSError` cleanup in the code under test runs."""


class CrashPoints:
    """Counts the mutating calls made on a filesystem instance and crashes at call number `at` (1-based) or at the
    first call whose description ("write PATH", "rm PATH", ...) matches the regex `match`: a write is cut halfway
    (half its bytes reach the file), any other call before it runs. `crash` is SIGKILL for stores that outlive the
    process. After the crash every call crashes again: a dead process does nothing more (a library that catches the
    simulated crash, as DCP does to report it, must not get to clean up).
    """

    MUTATING = ("makedirs", "mkdir", "rm", "rm_file", "mv", "cp_file")

    def __init__(self, fs, crash, at=None, match: str | None = None):
        self.fs, self.crash, self.at, self.match = fs, crash, at, match
        self.calls: list[str] = []
        self.crashed = False
        for name in ("open", *self.MUTATING):
            setattr(fs, name, self._wrap(name, getattr(fs, name)))

    def disarm(self):
        for name in ("open", *self.MUTATING):
            delattr(self.fs, name)  # the class's method again (fsspec caches and shares instances)

    def _is_crash_point(self, description: str) -> bool:
        if self.crashed:
            return True
        self.calls.append(description)
        if self.match is not None:
            return re.search(self.match, description) is not None
        return len(self.calls) == self.at

    def _wrap(self, name, original):
        def call(path, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", "rb")
            if name != "open" or self.crashed:
                if self._is_crash_point(f"{name} {path}"):
                    self.crashed = True
                    self.crash()
                return original(path, *args, **kwargs)
            handle = original(path, *args, **kwargs)
            if "w" in mode and self._is_crash_point(f"write {path}"):
                write = handle.write

                def half_then_crash(data):
                    write(data[: len(data) // 2])
                    handle.flush()
                    self.crashed = True
                    self.crash()

                handle.write = half_then_crash
            return handle

        return call


def _sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_crash():
    raise SimulatedCrash


SWEEP_STEPS = (1, 2, 3)
SWEEP_FILES = {step: _shared(torch_bytes({"w": torch.full((64,), float(step))}))() for step in range(1, 5)}


def _sweep_tensors(step):
    return {"w": torch.full((256,), float(step)), "v": torch.arange(8.0) + step}


def _save_sweep_steps(url, steps, returned, crash=None, at=None):
    """Save `steps` (keep_last=2) as a run would, appending each step to `returned` once its save has returned."""
    ckpt = Checkpointer(url, keep_last=2)
    points = CrashPoints(ckpt.fs, crash, at=at) if crash else None
    try:
        for step in steps:
            ckpt.save(step, lambda step=step: SWEEP_FILES[step], torch_bytes({"rank": 0}), _sweep_tensors(step))
            returned(step)
    finally:
        if points is not None and crash is _raise_crash:
            points.disarm()
    return points.calls if points else []


def _check_after_crash(url, last_returned):
    """What resume=auto sees after the crash: the newest complete checkpoint, loadable with verified hashes; then the
    resumed run saves up to step 4, after which only the last two checkpoints exist, with no crash debris."""
    ckpt = Checkpointer(url, keep_last=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a partial copy is passed over with a warning: the expected outcome here
        latest = ckpt.latest()
    resumed = int(latest.rsplit("_", 1)[-1]) if latest else 0
    assert resumed in (last_returned, last_returned + 1)  # the one being saved counts once its commit was done
    if latest:
        weights = ckpt.read_verified(latest, "weights.bin")
        assert weights == SWEEP_FILES[resumed]["weights.bin"]
        assert ckpt.read_torch(latest, "rank_00000.pt") == {"rank": 0}
        state = {key: torch.zeros_like(value) for key, value in _sweep_tensors(0).items()}
        read_sharded(state, f"{latest}/{STATE_DIR}")
        assert all(torch.equal(state[key], value) for key, value in _sweep_tensors(resumed).items())
    _save_sweep_steps(url, range(resumed + 1, 5), returned=lambda step: None)
    fs, root = fsspec.core.url_to_fs(url)
    left = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False))
    assert left == ["step_00000003", "step_00000004"]


def _forked_crash(url, at, log: Path) -> int:
    """Run the sweep's saves in a forked child that SIGKILLs itself at call `at`; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:

            def returned(step):
                with open(log, "a") as f:
                    f.write(f"{step}\n")

            _save_sweep_steps(url, SWEEP_STEPS, returned, crash=_sigkill, at=at)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("store", ["file", "copydelete"])
def test_sigkill_at_every_point_of_save_leaves_a_resumable_newest_checkpoint(tmp_path, store):
    fsspec.register_implementation("copydelete", CopyThenDelete, clobber=True)
    calls = _save_sweep_steps(f"{store}://{tmp_path / 'count'}", SWEEP_STEPS, lambda s: None, _sigkill, 0)
    assert {"write", "rm" if store == "file" else "rm_file"} <= {call.split()[0] for call in calls}
    total_calls = len(calls)
    for at in range(1, total_calls + 1):
        url, log = f"{store}://{tmp_path / str(at)}", tmp_path / f"returned-{at}"
        log.touch()
        status = _forked_crash(url, at, log)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"call {at} was not reached"
        returned = [int(line) for line in log.read_text().split()]
        _check_after_crash(url, returned[-1] if returned else 0)


def test_a_crash_at_every_point_of_save_on_an_object_store_leaves_a_resumable_newest_checkpoint():
    calls = _save_sweep_steps("memory://sweep-count", SWEEP_STEPS, lambda s: None, _raise_crash, 0)
    assert {"write", "rm_file"} <= {call.split()[0] for call in calls}
    total_calls = len(calls)
    for at in range(1, total_calls + 1):
        url, returned = f"memory://sweep-{at}", []
        with pytest.raises(SimulatedCrash):
            _save_sweep_steps(url, SWEEP_STEPS, returned.append, crash=_raise_crash, at=at)
        _check_after_crash(url, returned[-1] if returned else 0)
    fs = fsspec.filesystem("memory")
    for entry in fs.ls("/", detail=False):
        if entry.lstrip("/").startswith("sweep-"):
            fs.rm(entry, recursive=True)


def pretrain_crashing_at(pattern: str, argv: list[str]) -> None:
    """`python -c` entry for the test below: train argv, SIGKILLed at the first checkpoint call matching `pattern`."""
    fsspec.register_implementation("copydelete", CopyThenDelete, clobber=True)
    trainer = build_trainer(load_config(argv[0], argv[1:]), CPU)
    if pattern:
        CrashPoints(trainer.checkpointer.fs, _sigkill, match=pattern)
    trainer.fit()


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_pattern, resumes_from, asynchronous",
    [
        (r"^write .*step_00000006/trainer\.pt$", 3, False),  # mid-write of the new checkpoint's files
        (r"^rm .*/step_00000003/COMPLETE\.json$", 6, False),  # the new one committed, the old one being pruned
        (r"^write .*step_00000006/state/.*\.distcp$", 3, True),  # inside DCP's background write
    ],
    ids=["mid-write", "mid-prune", "mid-async-write"],
)
def test_a_run_killed_inside_save_resumes_from_the_newest_complete_checkpoint(
    tmp_path, crash_pattern, resumes_from, asynchronous
):
    def pretrain(out: Path, pattern: str = "", *extra: str):
        argv = [str(REPO / "recipes" / "ci_tiny_video.yaml"), *SMALL, *VIDEO, f"train.output_dir={out}"]
        argv += ["train.max_steps=9", "train.checkpoint_interval_steps=3", "train.keep_last_checkpoints=1", *extra]
        if asynchronous and pattern:  # DCP writes through fsspec (where the calls are counted) on a non-local store
            argv += [
                "train.checkpoint_async=true",
                f"train.checkpoint_dir=copydelete://{out}/ci_tiny_video/checkpoints",
            ]
        script = (
            "import sys; from tests.test_checkpoint import pretrain_crashing_at as run; run(sys.argv[1], sys.argv[2:])"
        )
        return subprocess.run([sys.executable, "-c", script, pattern, *argv], cwd=REPO, capture_output=True, text=True)

    straight = pretrain(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = pretrain(tmp_path / "killed", crash_pattern)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = pretrain(tmp_path / "killed", "", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "killed" / "ci_tiny_video"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{resumes_from:08d}")
    assert train_records(run_dir) == train_records(tmp_path / "straight" / "ci_tiny_video")  # bit for bit
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000009"]


def test_checkpoint_loading_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    path = ckpt.save(1, lambda: {"trainer.pt": torch_bytes({"x": Evil()})}, b"")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        ckpt.read_torch(path, "trainer.pt")


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
    checkpoint_bytes = sum(f.stat().st_size for f in Path(probe.checkpointer.latest()).rglob("*") if f.is_file())
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
    assert ckpt.read_torch(ckpt.latest(), "trainer.pt")["step"] == 2  # verified: sizes and hashes match


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    trainer = _trainer(tmp_path, "train.max_steps=20", "train.max_bad_steps=3")
    before = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    trainer.train_loader.dataset.clips[:] = float("nan")  # corrupt every sample
    with pytest.raises(Exception, match=r"3 steps in a row .* non-finite loss"):
        trainer.fit()
    assert trainer.step == 3 and trainer.skipped_steps == 3
    assert all(torch.equal(before[k], v) for k, v in trainer.objective.state_dict().items())  # no update


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


class GatedStore(LocalFileSystem):
    """`gated:///dir`: a local directory whose DCP shard writes wait until `gate` is set (an object store that is
    slow to take a checkpoint)."""

    protocol = ("gated",)
    gate = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("gated://"))

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode and str(path).endswith(".distcp") and not self.gate.wait(timeout=120):
            raise OSError(errno.ETIMEDOUT, "the gate was never opened", path)
        return super().open(path, mode, **kwargs)


class OpenGateAtStep(Callback):
    def __init__(self, step: int):
        self.step, self.seen = step, {}

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            self.seen = {"latest": trainer.checkpointer.latest(), "writing": trainer.checkpointer.pending is not None}
            GatedStore.gate.set()


@pytest.mark.slow
def test_an_async_save_lets_training_go_on_and_saves_the_state_of_its_step(tmp_path):
    """Step 3 runs while the step-2 checkpoint cannot be written (its shard writes wait at a gate that only step 3's
    end opens); the step-2 checkpoint, committed later, holds the step-2 state: the same as a synchronous save's."""
    fsspec.register_implementation("gated", GatedStore, clobber=True)
    GatedStore.gate.clear()
    every_2 = ["train.max_steps=4", "train.checkpoint_interval_steps=2", "train.keep_last_checkpoints=2"]
    _trainer(tmp_path / "sync", *every_2).fit()
    gate = OpenGateAtStep(3)
    run = _trainer(
        tmp_path / "async",
        *every_2,
        "train.checkpoint_async=true",
        f"train.checkpoint_dir=gated://{tmp_path}/async/ckpt",
        callbacks=[gate],
    )
    run.fit()
    assert gate.seen == {"latest": None, "writing": True}  # step 3 ran while the step-2 write was held
    assert [Path(p).name for p in run.checkpointer.complete_checkpoints()] == ["step_00000002", "step_00000004"]
    for step in (2, 4):
        name = f"step_{step:08d}"
        _, expected, _ = load_checkpoint(str(tmp_path / "sync" / "ci_tiny_video" / "checkpoints" / name))
        _, got, _ = load_checkpoint(str(tmp_path / "async" / "ckpt" / name))
        assert all(torch.equal(got.state_dict()[k], v) for k, v in expected.state_dict().items()), step


def test_resume_refuses_a_changed_recipe_unless_the_keys_are_allowed(tmp_path):
    """A resumed run whose recipe computes differently (MCMC steps, data seed, global batch) would mix two runs and
    miscount tokens and FLOPs (before: accepted silently); train.resume_allow_changes lets named keys through."""
    _trainer(tmp_path, "train.max_steps=2").fit()
    changed = ["train.max_steps=4", "train.resume=auto", "mcmc.num_steps=3", "data.seed=7", "data.micro_batch_size=8"]
    with pytest.raises(CheckpointError) as refused:
        _trainer(tmp_path, *changed).fit()
    message = str(refused.value)
    assert "\n" not in message and "step_00000002 was saved under another recipe" in message
    assert "mcmc.num_steps 2 -> 3" in message and "data.seed 0 -> 7" in message and "global_batch 4 -> 8" in message
    assert "train.resume_allow_changes=[mcmc.num_steps,data.seed,global_batch]" in message

    allowed = "train.resume_allow_changes=[mcmc.num_steps,data.seed,global_batch]"
    trainer = _trainer(tmp_path, *changed, allowed)
    summary = trainer.fit()
    seq_len = trainer.cfg.data.seq_len
    assert summary["steps"] == 4 and summary["frames"] == 2 * 4 * seq_len + 2 * 8 * seq_len
    two_step_flops = trainer.flops_per_token  # counted for 3 MCMC steps now; the first 2 steps had 2
    assert summary["scale"]["flops"] < summary["frames"] * two_step_flops


class DiskFullAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise OSError(28, "No space left on device (metrics disk)")


@pytest.mark.slow
def test_a_run_that_fails_between_steps_keeps_the_step_it_finished(tmp_path):
    """With no periodic checkpoints, a failure after step 3 (here a callback's full disk) used to lose all three
    steps; now the finished step is saved, and the resumed run follows the uninterrupted one exactly."""
    whole = Recorder()
    _trainer(tmp_path / "whole", "train.max_steps=6", callbacks=[whole]).fit()
    with pytest.raises(OSError, match="No space left"):
        _trainer(tmp_path / "failed", "train.max_steps=6", callbacks=[DiskFullAt(3)]).fit()
    assert (
        Checkpointer(str(tmp_path / "failed" / "ci_tiny_video" / "checkpoints"), keep_last=1)
        .latest()
        .endswith("step_00000003")
    )
    resumed = Recorder()
    summary = _trainer(tmp_path / "failed", "train.max_steps=6", "train.resume=auto", callbacks=[resumed]).fit()
    assert summary["steps"] == 6
    assert [m["loss"] for m in resumed.train] == [m["loss"] for m in whole.train[3:]]
