"""Atomic, verifiable checkpoints on any fsspec filesystem (local, file://, s3://, gs://, memory:// in tests).

Layout of one checkpoint, `<dir>/step_00000050/`:
    state/              model (+ alpha) and optimizer state, written by torch.distributed.checkpoint (DCP): every
                        rank writes its own shard (`__0_0.distcp` ...), `.metadata` says where each piece lies, so a
                        checkpoint loads resharded onto any number of ranks (ebwm_scale/parallel/checkpoint_form.py)
    trainer.pt          step, counters, callback states, the parallel layout (torch.load(weights_only=True))
    rank_00000.pt ...   per rank: RNG states (python, numpy, torch, cuda), the data-loader position, and under
                        DeepSpeed ZeRO the rank's optimizer partition
    config.yaml         the resolved recipe
    COMPLETE.json       written last: size of every file above, and sha256 of every file outside state/

On a local filesystem a checkpoint is written under `.tmp-step_…`, fsynced, its manifest added, then renamed into
place (an atomic rename). Object stores have no atomic rename (fsspec's `mv` copies, then deletes), so there the files
are written in place and the manifest, one object, is written last; removal deletes the manifest first. Either way a
crash at any point leaves either the old state or a directory whose manifest is missing or does not match its files:
`latest()` checks every file's size against the manifest and falls back to the previous checkpoint, and reads
check sha256 too (DCP's shards are checked by size; hashing gigabytes per save in Python is what DCP avoids).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPError  # a BaseException

from ebwm_scale.errors import UserError
from ebwm_scale.logs import log
from ebwm_scale.parallel import collectives
from ebwm_scale.train.callbacks import Callback

if TYPE_CHECKING:
    from ebwm_scale.train.trainer import Trainer

MANIFEST = "COMPLETE.json"
STATE_DIR = "state"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
NAME_PATTERN = re.compile(r"^step_(\d{8})$")
NO_MANIFEST = f"no readable {MANIFEST}"  # a checkpoint being written, or one a crash cut short: nothing to report


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, in a form torch.load(weights_only=True) accepts."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # the global generator is always the legacy MT19937: a tuple, never a dict
    _, key, pos, has_gauss, cached = legacy
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def seed_all(seed: int, step: int, stream: int) -> None:
    """Seed every RNG from (seed, step, stream): the random streams of a run resumed on other ranks."""
    value = int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _barrier() -> None:
    if dist.is_initialized():
        collectives.barrier()


@dataclass
class PendingSave:
    step: int
    tmp: str
    final: str
    rank_entries: list[dict[str, Any]]


class Checkpointer:
    """Saves and finds checkpoints under one directory URL. Every rank calls save/load; rank 0 commits."""

    def __init__(
        self,
        url: str,
        keep_last: int,
        rank: int = 0,
        world_size: int = 1,
        keep_steps: tuple[int, ...] = (),
        asynchronous: bool = False,
    ):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.keep_last = keep_last
        self.keep_names = {checkpoint_name(step) for step in keep_steps}  # never pruned (e.g. branch points)
        self.rank = rank
        self.world_size = world_size
        self.is_local = is_local(self.fs)  # only there is rename atomic
        self.asynchronous = asynchronous
        # an asynchronous save whose shards are still being written, and DCP's background write
        self.pending: tuple[PendingSave, Future] | None = None
        self.committed: list[tuple[int, str]] = []  # (step, path) of commits not yet announced
        # DCP's background thread exchanges its write results over a group of its own: on the training group it
        # would interleave with the training's collectives (measured: a hang).
        self._write_group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _write(self, path: str, data: bytes) -> dict[str, Any]:
        with self.fs.open(path, "wb") as f:
            f.write(data)
            f.flush()
            if self.is_local:
                os.fsync(f.fileno())
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _fsync_dir(self, path: str) -> None:
        if self.is_local:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def check_writable(self) -> None:
        """Fail at start, not after hours of training, when the directory cannot take files or is not one directory
        that every rank sees (a relative or node-local path on a multi-node job: each node would hold its own part
        of every checkpoint). Every rank calls it."""
        probe = self._path(f".write-probe-{self.rank}")
        error = None
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self._write(probe, b"ok")
        except OSError as caught:
            error = f"checkpoint directory {self.url} is not writable: {caught}"
        if dist.is_initialized():
            error = _first_error(error, self.world_size)
            if error is None:  # every rank must see rank 0's probe: one check per rank, whatever the rank count
                unseen = None if self.fs.exists(self._path(".write-probe-0")) else self.rank
                unseen_by = [None] * self.world_size
                collectives.all_gather_object(unseen_by, unseen)
                blind = [rank for rank in unseen_by if rank is not None]
                if blind:
                    error = (
                        f"train.checkpoint_dir={self.url} is not the same directory on every rank (rank {blind[0]} "
                        "cannot see rank 0's files): multi-node runs need a shared filesystem or an object store, "
                        "given as an absolute path or URL"
                    )
            _barrier()  # no probe is removed before every rank has looked
        try:
            self.fs.rm(probe)
        except OSError:
            pass  # a probe left behind changes nothing
        if error is not None:
            raise CheckpointError(error)

    def save(
        self,
        step: int,
        shared: Callable[[], dict[str, bytes]],
        per_rank: bytes,
        state: dict[str, Any] | None = None,
    ) -> str:
        """Write checkpoint `step`: `shared` builds rank 0's files (name -> bytes), each rank passes its own bytes
        and its part of the DCP `state`. Returns the final path. Synchronous: committed on return. Asynchronous: the
        state is copied and written in the background, committed by poll() or finish() (a pending save is finished
        before the next begins). On any write error (on any rank) the directory is removed and every rank raises
        CheckpointError; earlier checkpoints are untouched."""
        self.finish()
        name = checkpoint_name(step)
        final = self._path(name)
        tmp = self._path(f".tmp-{name}") if self.is_local else final
        entries: dict[str, Any] = {}
        error = None
        try:
            if self.rank == 0:
                if self.fs.exists(tmp):  # left by a crash (never complete), or a re-save of this step
                    self._remove(tmp)
                self.fs.makedirs(tmp, exist_ok=True)
        except OSError as caught:
            error = f"cannot write checkpoint {final}: {caught}"
        _barrier()
        if error is None:
            try:
                entries[rank_file(self.rank)] = self._write(f"{tmp}/{rank_file(self.rank)}", per_rank)
                if self.rank == 0:
                    for file_name, data in shared().items():
                        entries[file_name] = self._write(f"{tmp}/{file_name}", data)
            except OSError as caught:
                error = f"cannot write checkpoint {final}: {caught}"
        gathered: list[Any] = [(entries, error)]
        if dist.is_initialized():
            gathered = [None] * self.world_size
            collectives.all_gather_object(gathered, (entries, error))
        error = next((e for _, e in gathered if e), None)  # the same on every rank
        pending = PendingSave(step, tmp, final, [e for e, _ in gathered])
        if state is not None and error is None:
            url = self._url_of(f"{tmp}/{STATE_DIR}")
            try:
                write = _dcp_save(state, url, self._write_group, self.asynchronous)
                if write is not None:
                    self.pending = (pending, write)
                    return final
            except (Exception, DCPError) as caught:  # DCP raises any rank's failure on every rank
                error = f"cannot write checkpoint {final}/{STATE_DIR}: {_first_line(caught)}"
        self._conclude(pending, error)
        return final

    def poll(self) -> None:
        """Commit the pending asynchronous save if every rank's write has finished (a collective while one is
        pending; call it at the same point on every rank)."""
        if self.pending is None:
            return
        done = torch.tensor([1 if self.pending[1].done() else 0])
        if dist.is_initialized():
            collectives.all_reduce(done, op=collectives.ReduceOp.MIN)
        if done.item():
            self.finish()

    def finish(self) -> None:
        """Wait for the pending asynchronous save, then commit it (every rank calls it)."""
        if self.pending is None:
            return
        (pending, write), self.pending = self.pending, None
        error = None
        try:
            write.result()
        except (Exception, DCPError) as caught:
            error = f"cannot write checkpoint {pending.final}/{STATE_DIR}: {_first_line(caught)}"
        if dist.is_initialized():
            error = _first_error(error, self.world_size)
        self._conclude(pending, error)

    def _conclude(self, pending: PendingSave, error: str | None) -> None:
        """Rank 0 commits (or, after an error on any rank, removes) the checkpoint; every rank learns the outcome."""
        if self.rank == 0:
            if error is None:
                try:
                    self._commit(pending.step, pending.tmp, pending.final, pending.rank_entries)
                except OSError as caught:
                    error = f"cannot commit checkpoint {pending.final}: {caught}"
            if error is not None:
                self._discard(pending.tmp)
        outcome = [error]
        if dist.is_initialized():
            collectives.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointError(outcome[0])
        self.committed.append((pending.step, pending.final))

    def _url_of(self, path: str) -> str:
        """A path of this checkpointer's filesystem as a URL another library (DCP) can open."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _commit(self, step: int, tmp: str, final: str, rank_entries: list[dict[str, Any]]) -> None:
        manifest: dict[str, Any] = {"step": step, "world_size": self.world_size, "files": {}}
        for entries in rank_entries:
            manifest["files"].update(entries)
        if self.fs.exists(f"{tmp}/{STATE_DIR}"):
            for path, info in self.fs.find(f"{tmp}/{STATE_DIR}", detail=True).items():
                manifest["files"][path[len(tmp) + 1 :]] = {"bytes": info["size"]}
        self._write(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if self.is_local:
            self._fsync_dir(tmp)
            if self.fs.exists(final):  # a re-save of the same step
                self._remove(final)
            self.fs.mv(tmp, final, recursive=True)
            self._fsync_dir(self.root)
        self._prune(step)

    def _remove(self, path: str) -> None:
        """Manifest first: a removal cut short leaves an incomplete checkpoint, never a manifest over missing files."""
        if self.fs.exists(f"{path}/{MANIFEST}"):
            self.fs.rm(f"{path}/{MANIFEST}")
        self.fs.rm(path, recursive=True)

    def _discard(self, tmp: str) -> None:
        if self.rank == 0:
            try:
                self._remove(tmp)
            except OSError:
                pass  # the write already failed; the directory has no manifest and is never loaded

    def _prune(self, committed_step: int) -> None:
        """Keep the newest `keep_last` complete checkpoints (and `keep_steps`); remove older ones and whatever a crash
        left behind before `committed_step` (a half-written or half-removed directory)."""
        complete = self.complete_checkpoints()
        rotating = [path for path in complete if path.rsplit("/", 1)[-1] not in self.keep_names]
        doomed = set(rotating[: max(0, len(rotating) - self.keep_last)])
        for entry in self.fs.ls(self.root, detail=False):
            entry = entry.rstrip("/")
            match = NAME_PATTERN.match(entry.rsplit("/", 1)[-1].removeprefix(".tmp-"))
            if match and int(match.group(1)) < committed_step and entry not in complete:
                doomed.add(entry)
        for path in sorted(doomed):
            self._remove(path)

    def _manifest(self, fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
        try:
            with fs.open(f"{path}/{MANIFEST}", "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def incomplete_reason(self, path: str) -> str | None:
        """Why the checkpoint at `path` cannot be trusted (no manifest, a file missing or of the wrong size), or
        None. One listing, no reads: cheap enough to run on every candidate; sha256 is checked on load."""
        manifest = self._manifest(self.fs, path)
        if manifest is None:
            return NO_MANIFEST
        try:
            prefix = path.rstrip("/") + "/"
            sizes = {name.removeprefix(prefix): info["size"] for name, info in self.fs.find(path, detail=True).items()}
        except OSError as error:
            return f"cannot list it: {error}"
        for file_name, expected in manifest["files"].items():
            if file_name not in sizes:
                return f"{file_name} is missing"
            if sizes[file_name] != expected["bytes"]:
                return f"{file_name} has {sizes[file_name]} bytes, its manifest says {expected['bytes']}"
        return None

    def complete_checkpoints(self, warn: bool = False) -> list[str]:
        """Paths (in this filesystem) of checkpoints whose manifest matches their files' sizes, oldest first.
        `warn`: say why each directory that has a manifest but fails the check is passed over."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            entry = entry.rstrip("/")
            match = NAME_PATTERN.match(entry.rsplit("/", 1)[-1])
            if not match:
                continue
            reason = self.incomplete_reason(entry)
            if reason is None:
                found.append((int(match.group(1)), entry))
            elif warn and self.rank == 0 and reason != NO_MANIFEST:
                warnings.warn(f"checkpoint {entry} passed over: {reason}", stacklevel=3)
        return [path for _, path in sorted(found)]

    def latest(self) -> str | None:
        """URL (in the form this checkpointer was given) of the newest complete checkpoint, or None."""
        complete = self.complete_checkpoints(warn=True)
        return f"{self.url.rstrip('/')}/{complete[-1].rsplit('/', 1)[-1]}" if complete else None

    def read_verified(self, url: str, file_name: str) -> bytes:
        """One file of the checkpoint at `url`, checked against the manifest's size and sha256."""
        fs, path = fsspec.core.url_to_fs(url)
        manifest = self._manifest(fs, path)
        if manifest is None:
            raise CheckpointError(f"{url} is not a complete checkpoint ({NO_MANIFEST})")
        expected = manifest["files"].get(file_name)
        if expected is None:
            raise CheckpointError(f"{url} has no {file_name} (it was saved by {manifest['world_size']} ranks)")
        try:
            with fs.open(f"{path}/{file_name}", "rb") as f:
                data = f.read()
        except OSError as error:
            raise CheckpointError(f"cannot read {url}/{file_name}: {error}") from None
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise CheckpointError(
                f"{url}/{file_name} does not match its manifest: the checkpoint is corrupt (remove it to resume "
                "from the previous one)"
            )
        return data

    def check_format(self, url: str) -> None:
        """A complete checkpoint of this format (sharded state), or CheckpointError."""
        fs, path = fsspec.core.url_to_fs(url)
        manifest = self._manifest(fs, path)
        if manifest is None:
            raise CheckpointError(f"{url} is not a complete checkpoint ({NO_MANIFEST})")
        if not any(name.startswith(f"{STATE_DIR}/") for name in manifest["files"]):
            raise CheckpointError(
                f"{url} is in the format of an earlier ebwm-scale (one model.safetensors, no sharded {STATE_DIR}/): "
                "export it with that version's tools/export.py and start a new run with train.init_from"
            )

    def read_torch(self, url: str, file_name: str, safe_globals: list | None = None) -> Any:
        """A verified torch file of the checkpoint, loaded with weights_only=True (`safe_globals`: plain data classes,
        e.g. DeepSpeed's ZeRO state, it may rebuild)."""
        with torch.serialization.safe_globals(safe_globals or []):
            return torch_from_bytes(self.read_verified(url, file_name))


def _first_error(error: str | None, world_size: int) -> str | None:
    """The first rank's error, on every rank (a collective)."""
    errors = [None] * world_size
    collectives.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _first_line(error: BaseException) -> str:
    if isinstance(error, DCPError) and error.failures:  # DCP's own message names only the failing ranks
        rank, (cause, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {_first_line(cause)}"
    chained: BaseException | None = error
    while chained is not None and not isinstance(chained, OSError):  # torch.save reports a failed write vaguely
        chained = chained.__cause__ or chained.__context__
    text = str(chained or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dcp_save(state: dict[str, Any], url: str, group, asynchronous: bool) -> Future | None:
    """DCP save of `state` into the directory `url` (local path or fsspec URL), every rank its own part; asynchronous:
    the state is copied now and written by a background thread (the returned future)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        writer, no_dist = _storage(url, write=True), not dist.is_initialized()
        if asynchronous:
            response = dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=no_dist)
            # a stager that copies in the background answers with two futures: the write is the upload's
            return response.upload_completion if isinstance(response, AsyncSaveResponse) else response
        dcp.save(state, storage_writer=writer, no_dist=no_dist)
        return None


def read_sharded(state: dict[str, Any], url: str, collective: bool = True) -> None:
    """DCP load into `state` in place, resharding from however the checkpoint was cut. `collective`: every rank of
    the process group calls it (else this process reads alone, e.g. an export)."""
    import torch.distributed.checkpoint as dcp

    try:
        no_dist = not (collective and dist.is_initialized())
        with warnings.catch_warnings():  # DCP warns that a process without a group reads alone: that is asked for
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=_storage(url, write=False), no_dist=no_dist)
    except (Exception, DCPError) as error:
        raise CheckpointError(f"cannot load {url}: {_first_line(error)}") from None


def _storage(url: str, write: bool):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    fs, _ = fsspec.core.url_to_fs(url)
    if is_local(fs):
        path = fsspec.core.strip_protocol(url)
        return dcp.FileSystemWriter(path) if write else dcp.FileSystemReader(path)
    return FsspecWriter(url) if write else FsspecReader(url)


class CheckpointCallback(Callback):
    """Saves every `interval_steps`, at each of `at_steps`, when a stop was requested (preemption), and at the end of
    a run."""

    def __init__(self, interval_steps: int, at_steps: tuple[int, ...] = ()):
        self.interval_steps = interval_steps
        self.at_steps = set(at_steps)
        self.last_saved_step = -1

    def _save(self, trainer: Trainer) -> None:
        if trainer.step != self.last_saved_step:
            trainer.save_checkpoint()
            self.last_saved_step = trainer.step

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_saved_step = trainer.step  # the resumed checkpoint needs no re-save
        trainer.checkpointer.check_writable()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        trainer.checkpointer.poll()  # an asynchronous save whose writes have all finished is committed
        trainer.announce_checkpoints()
        if trainer.stop_requested or step in self.at_steps or (self.interval_steps and step % self.interval_steps == 0):
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any], error: BaseException | None) -> None:
        # After an error another rank may be gone or inside a collective: nothing to save, nothing committed. A
        # single process that failed between two steps (an evaluation, a callback) keeps the step it finished.
        if error is None:
            self._save(trainer)
            trainer.checkpointer.finish()
            trainer.announce_checkpoints()
        elif isinstance(error, Exception) and trainer.at_step_boundary and trainer.dist.world_size == 1:
            if self.last_saved_step < 0:  # failed before this callback started: nothing new to keep
                return
            try:
                self._save(trainer)
                trainer.checkpointer.finish()
                trainer.announce_checkpoints()
            except Exception as failed:  # the run's own error is the one to report
                log.warning(f"no checkpoint after the failure at step {trainer.step}: {failed}")
