"""The training loop: accumulate, all-reduce, guard against non-finite steps, clip, step, schedule, evaluate,
checkpoint, stop cleanly on SIGTERM/SIGUSR1. Output (console, MLflow, metrics file, checkpoints) is callbacks."""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ebwm_scale.core.objective import ARObjective, EBTObjective, build_objective
from ebwm_scale.core.replay import ReplayBuffer
from ebwm_scale.data.config import TrainSet
from ebwm_scale.data.sampler import SampleDataset, fixed_batches
from ebwm_scale.errors import UserError
from ebwm_scale.models.blocks import count_params
from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.dist import DistInfo, all_reduce_mean
from ebwm_scale.parallel.engines import Engine, build_engine
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.checkpoint import (
    CONFIG_FILE,
    STATE_DIR,
    TRAINER_FILE,
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    rank_file,
    read_sharded,
    restore_rng_state,
    seed_all,
    torch_bytes,
)
from ebwm_scale.train.metrics import model_state_gb_per_rank, peak_memory_gb, peak_tflops, train_flops_per_token
from ebwm_scale.train.optim import lr_at
from ebwm_scale.train.resume import check_recipe

if TYPE_CHECKING:
    from ebwm_scale.config import PretrainConfig

EVAL_NOISE_SEED = 1234  # every eval starts the MCMC chains from the same noise, so evals are comparable
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM preemption sends one of these before the kill


class NonFiniteError(UserError, RuntimeError):
    """Too many steps in a row had a non-finite loss, energy, alpha or gradient."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(
        self,
        cfg: PretrainConfig,
        objective: EBTObjective | ARObjective,
        train_set: TrainSet,
        val_set: SampleDataset,
        data_info: dict[str, str],
        dist: DistInfo,
        callbacks: list[Callback],
        initial_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
    ):
        """`initial_weights`: the unsharded weights a new run starts from (train.init_from), read only when the run
        does not resume."""
        self.cfg = cfg
        self.initial_weights = initial_weights
        self.objective = objective
        self.val_set = val_set
        self.data_info = data_info
        self.dist = dist
        self.callbacks = callbacks
        self.engine: Engine = build_engine(
            objective,
            cfg.parallel,
            dist,
            partial(cfg.optim.build, alpha_lr_multiplier=cfg.mcmc.alpha_lr_multiplier),
            micro_batch_size=cfg.data.micro_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            grad_clip=cfg.optim.grad_clip,
            mcmc=cfg.mcmc,
        )
        self.train_loader = cfg.data.build_loader(train_set, dist.dp_rank, dist.dp_size)
        self.step = 0
        self.tokens_seen = 0  # summed per step: a run resumed on other ranks may change the tokens per step
        self.flops_seen = 0.0  # summed per step too: a resume with allowed recipe changes may change FLOPs per token
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None
        self.at_step_boundary = True  # the state is that of a finished step: a checkpoint of it resumes exactly
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.stop_requested: str | None = None  # the name of the signal that asked us to stop
        self.resumed_from = ""
        self.max_steps = cfg.train.max_steps
        self.run_name = cfg.train.run_name
        self.output_dir = Path(cfg.train.output_dir) / self.run_name
        self.checkpointer = Checkpointer(
            cfg.train.checkpoint_dir or str(self.output_dir / "checkpoints"),
            cfg.train.keep_last_checkpoints,
            dist.rank,
            dist.world_size,
            tuple(cfg.train.checkpoint_at_steps),
            cfg.train.checkpoint_async,
        )
        self.unit = "tokens" if cfg.model.modality == "text" else "frames"
        self.tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * dist.dp_size
        with torch.device("meta"):  # sizes and FLOPs of the whole model, however this rank's part is cut
            whole = build_objective(cfg.model.build(), cfg.mcmc.build())
        self.num_params = count_params(whole)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.mcmc, cfg.data.seq_len)
        self.peak_tflops = peak_tflops(dist.device, cfg.train.peak_tflops)
        self.autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def describe(self) -> list[str]:
        c, d = self.cfg, self.dist
        return [
            f"run {self.run_name}: {c.model.kind.upper()}-{c.model.modality}, {self.num_params:,} parameters, "
            f"{c.model.num_layers} layers x {c.model.dim} dim, {self.flops_per_token / 1e6:.1f} MFLOP/{self.unit[:-1]}",
            f"data: {', '.join(f'{k} {v}' for k, v in self.data_info.items())}; "
            f"{self.tokens_per_step:,} {self.unit}/step",
            f"device {self.dist.device}, {self.dist.world_size} rank(s) ({self._parallel_mode()}), "
            f"{c.train.precision}; "
            f"resolved config: {self.output_dir / 'config.yaml'}; checkpoints: {self.checkpointer.url}",
            f"per step: {self.flops_per_token * self.tokens_per_step / 1e12:.3g} TFLOP (counted); "
            f"model states {self._model_state_gb():.2f} GB per rank "
            "(params + grads + AdamW; activations extra)",
            f"this rank: host {socket.gethostname()}, {d.device}, data-parallel rank {d.dp_rank} of {d.dp_size}, "
            f"pipeline stage {d.pp_rank} of {d.pp_size}, tensor-parallel rank {d.rank % d.tp_size} of {d.tp_size}",
        ]

    def _model_state_gb(self) -> float:
        p = self.cfg.parallel
        stage = {"zero": p.zero_stage, "fsdp": 3}.get(p.data_parallel, 1 if p.shard_optimizer else 0)
        return model_state_gb_per_rank(
            self.num_params // (self.dist.tp_size * self.dist.pp_size),
            self.cfg.train.precision,
            stage,
            self.dist.dp_size,
        )

    def _parallel_mode(self) -> str:
        p = self.cfg.parallel
        mode = {"zero": f"DeepSpeed ZeRO-{p.zero_stage}", "fsdp": "FSDP2, sharded parameters"}.get(
            p.data_parallel, "data parallel"
        )
        if p.shard_optimizer:
            mode += ", ZeRO-1 optimizer sharding"
        if p.tensor_parallel > 1:
            mode += f", tensor parallel {p.tensor_parallel}"
        if p.pipeline_parallel > 1:
            mode += f", pipeline {p.pipeline_parallel} stages x {p.pipeline_microbatches} micro-batches"
        return mode

    def run_tags(self) -> dict[str, str]:
        c = self.cfg
        return {
            "model_kind": c.model.kind,
            "modality": c.model.modality,
            "params": str(self.num_params),
            "size": f"{c.model.num_layers}L-{c.model.dim}d",
            "tokens": str(self.tokens_per_step * self.max_steps),
            "flops": f"{self.flops_per_token * self.tokens_per_step * self.max_steps:.4g}",
        }

    # ---- one optimizer step ----

    def train_step(self) -> dict[str, float]:
        """Accumulate, all-reduce, clip and step; a step whose loss, energy, alpha or gradient is not finite is
        skipped (no update), counted, and after train.max_bad_steps in a row the run stops."""
        self.at_step_boundary = False  # from the first batch on, the state is between two steps
        lr = partial(lr_at, self.step, self.cfg.optim, self.max_steps)  # a group's lr, given its lr_multiplier
        self.engine.set_lr(lr)
        accum = self.cfg.train.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        data_wait = 0.0
        for _ in range(accum):
            wait_start = time.perf_counter()
            batch = to_device(next(self.train_loader), self.dist.device)
            data_wait += time.perf_counter() - wait_start
            for key, value in self.engine.forward_backward(batch, self.autocast).items():
                sums[key] = sums.get(key, 0.0) + value.float() / accum
        metrics = all_reduce_mean({k: float(v) for k, v in sums.items()}, self.dist.world_size)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad and not self.engine.can_skip_steps:
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} at step {self.step + 1} under DeepSpeed ZeRO, whose gradients are "
                "already reduced into the optimizer's partitions, so the step cannot be skipped; resume from the "
                "last checkpoint with a lower optim.lr or mcmc.alpha_init"
            )
        metrics.update(grad_norm=self.engine.optimizer_step(skip=bool(bad)), lr=lr(1.0))
        bad = bad or ([] if math.isfinite(metrics["grad_norm"]) else ["grad_norm"])
        if bad:
            self.skipped_steps += 1
            self.bad_steps_in_a_row += 1
        else:
            self.bad_steps_in_a_row = 0
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.flops_seen += self.tokens_per_step * self.flops_per_token
        metrics.update(skipped_steps=self.skipped_steps, data_wait_s=data_wait, **self.train_loader.metrics())
        if bad and self.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_steps_in_a_row} steps in a row (up to step {self.step}) had non-finite "
                f"{', '.join(bad)}; stopping (train.max_bad_steps={self.cfg.train.max_bad_steps}). Lower optim.lr "
                "or mcmc.alpha_init, or check the data."
            )
        self.at_step_boundary = True
        return metrics

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's fixed validation batches, read once: fit() reads them before the first step, so a corrupt or
        missing validation shard stops the run before it trains, not at its first evaluation."""
        if self._eval_batches is None:
            c, d = self.cfg, self.dist
            batches = fixed_batches(self.val_set, c.data.micro_batch_size, c.train.eval_batches, d.dp_rank, d.dp_size)
            self._eval_batches = list(batches)
        return self._eval_batches

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first eval_batches validation batches, MCMC chains started from fixed noise."""
        self.objective.eval()
        sums: dict[str, float] = {}
        num_batches = 0
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            torch.manual_seed(EVAL_NOISE_SEED + self.dist.dp_rank)
            for batch in self.eval_batches():
                with self.autocast:
                    result = self.engine.evaluate(to_device(batch, self.dist.device))
                for key, value in result.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                num_batches += 1
        self.objective.train()
        return all_reduce_mean({k: v / num_batches for k, v in sums.items()}, self.dist.world_size)

    # ---- checkpoint state ----

    def layout(self) -> dict[str, Any]:
        """How this run is cut: a checkpoint resumes exactly (RNG streams, data positions) only under the same."""
        p = self.cfg.parallel
        return {
            "data_parallel": str(p.data_parallel),  # a plain string: trainer.pt loads with weights_only=True
            "zero_stage": p.zero_stage if p.data_parallel == "zero" else None,
            "world_size": self.dist.world_size,
            "tp_size": self.dist.tp_size,
            "pp_size": self.dist.pp_size,
            "data_workers": self.cfg.data.shards.num_workers,
        }

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds alike (saved once, by rank 0)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "flops_seen": self.flops_seen,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
            "layout": self.layout(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
        }

    def save_checkpoint(self) -> str:
        state = self.engine.checkpoint_state()
        rank_state = {"rng": capture_rng_state(), "loader": self.train_loader.state_dict()}
        if (engine_state := self.engine.rank_state()) is not None:
            rank_state["engine"] = engine_state
        if (replay := self._replay()) is not None:
            rank_state["replay"] = replay.state_dict()

        def shared_files() -> dict[str, bytes]:
            return {TRAINER_FILE: torch_bytes(self.shared_state()), CONFIG_FILE: self.cfg.to_yaml().encode()}

        path = self.checkpointer.save(self.step, shared_files, torch_bytes(rank_state), state)
        self.announce_checkpoints()
        return path

    def announce_checkpoints(self) -> None:
        """Tell the callbacks about every checkpoint committed since the last call."""
        while self.checkpointer.committed:
            step, path = self.checkpointer.committed.pop(0)
            for cb in self.callbacks:
                cb.on_checkpoint_saved(self, step, path)

    def resume(self, url: str) -> None:
        """Continue from the checkpoint at `url`: exactly under the same layout; on other ranks (a data-parallel,
        tensor-parallel or FSDP size change) with the weights and optimizer resharded, the data continued without
        repeating or skipping a sample, and the random streams re-seeded from (seed, step, data-parallel rank)."""
        self.checkpointer.check_format(url)
        shared = self.checkpointer.read_torch(url, TRAINER_FILE)
        saved = shared["layout"]
        saved_yaml = self.checkpointer.read_verified(url, CONFIG_FILE).decode()
        check_recipe(
            url, saved_yaml, saved["world_size"] // (saved["tp_size"] * saved["pp_size"]), self.cfg, self.dist.dp_size
        )
        same = saved == self.layout()
        if not same and (not self.engine.resizable or saved["data_parallel"] == "zero"):
            raise CheckpointError(
                f"{url} was saved by {saved['world_size']} ranks under {saved['data_parallel']} (ZeRO stage "
                f"{saved['zero_stage']}), this run has {self.dist.world_size} under {self.cfg.parallel.data_parallel}: "
                "DeepSpeed ZeRO checkpoints resume only on the same ranks and ZeRO stage; to change them, export the "
                "checkpoint (tools/export.py) and start from its weights with train.init_from"
            )
        state = self.engine.checkpoint_state()
        read_sharded(state, f"{url}/{STATE_DIR}")
        self.engine.load_checkpoint_state(state)
        self.step = shared["step"]
        self.tokens_seen = shared["tokens_seen"]
        self.flops_seen = shared.get("flops_seen", self.tokens_seen * self.flops_per_token)
        self.skipped_steps = shared["skipped_steps"]
        self.bad_steps_in_a_row = shared["bad_steps_in_a_row"]
        for cb in self.callbacks:
            cb.load_state_dict(shared["callbacks"].get(type(cb).__name__, {}))
        safe_globals = self.engine.checkpoint_safe_globals
        if same:
            rank = self.checkpointer.read_torch(url, rank_file(self.dist.rank), safe_globals)
            self.engine.load_rank_state(rank.get("engine"))
            self.train_loader.load_state_dict(rank["loader"])
            restore_rng_state(rank["rng"])
            if (replay := self._replay()) is not None:
                replay.load_state_dict(rank["replay"], self.dist.device)
            return
        if self._replay() is not None:
            raise CheckpointError(
                f"{url} holds a replay buffer per rank of its {saved['world_size']} ranks, this run has "
                f"{self.dist.world_size}: mcmc.replay resumes only on the same layout (mcmc.replay.size=0 continues "
                "without it)"
            )
        # One rank of each old data-parallel replica holds its loader state; rank 0 reads them for everyone.
        states: list[Any] = [None]
        if self.dist.is_rank0:
            old_ranks = range(0, saved["world_size"], saved["tp_size"] * saved["pp_size"])
            try:
                states[0] = [self.checkpointer.read_torch(url, rank_file(r), safe_globals)["loader"] for r in old_ranks]
            except CheckpointError as error:  # every rank must hear of it, or the others wait for the broadcast
                states[0] = str(error)
        if torch.distributed.is_initialized():
            collectives.broadcast_object_list(states, src=0)
        if isinstance(states[0], str):
            raise CheckpointError(states[0])
        self.train_loader.load_resized(states[0])
        seed_all(self.cfg.train.seed, self.step, self.dist.dp_rank)

    def _replay(self) -> ReplayBuffer | None:
        return self.objective.replay if isinstance(self.objective, EBTObjective) else None

    def _resume_url(self) -> str | None:
        resume, branch_from = self.cfg.train.resume, self.cfg.train.branch_from
        if resume == "none":
            return branch_from or None
        if resume == "auto":
            return self.checkpointer.latest() or branch_from or None
        return resume

    # ---- preemption ----

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = signal.Signals(signum).name

    def _agree_on_stop(self) -> None:
        """A signal may reach only some ranks; all must stop after the same step."""
        if not torch.distributed.is_initialized():
            return
        flag = torch.tensor([1 if self.stop_requested else 0])
        collectives.all_reduce(flag, op=collectives.ReduceOp.MAX)
        if flag.item() and not self.stop_requested:
            self.stop_requested = "signal on another rank"

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}

    # ---- the loop ----

    def fit(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resume_url = self._resume_url()
        if resume_url:
            self.resume(resume_url)
            self.resumed_from = resume_url
        elif self.initial_weights is not None:
            self.engine.load_model_state_dict(self.initial_weights())
        self.eval_batches()
        if self.dist.is_rank0:
            (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml())
        previous_handlers = self._install_signal_handlers()
        first_step, start = self.step, time.perf_counter()
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        error: BaseException | None = None
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            while self.step < self.max_steps and not self.stop_requested:
                step_start = time.perf_counter()
                last_train = self.train_step()
                self._agree_on_stop()
                self._add_throughput(last_train, time.perf_counter() - step_start)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, last_train)
                interval = self.cfg.train.eval_interval_steps
                if self.step == self.max_steps or (interval and self.step % interval == 0):
                    last_eval = self.evaluate()
                    for cb in self.callbacks:
                        cb.on_eval_end(self, self.step, last_eval)
        except BaseException as caught:
            error = caught
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            elapsed = time.perf_counter() - start
            summary = {
                "run": self.run_name,
                "status": "failed"
                if error
                else (f"stopped by {self.stop_requested}" if self.stop_requested else "finished"),
                "resumed_from": self.resumed_from,
                "scale": {  # what scaling fits need (ebwm-fit), for the steps actually trained
                    "kind": self.cfg.model.kind,
                    "params": self.num_params,
                    "data": self.tokens_seen,  # tokens (text) or predicted frames (video)
                    "unit": self.unit,
                    "flops": self.flops_seen,
                },
                "steps": self.step,
                "world_size": self.dist.world_size,
                "skipped_steps": self.skipped_steps,
                self.unit: self.tokens_seen,
                "wall_time_s": elapsed,
                f"{self.unit}_per_s": (self.step - first_step) * self.tokens_per_step / max(elapsed, 1e-9),
                "train_loss": last_train.get("loss", float("nan")),
                "eval_loss": last_eval.get("loss", float("nan")),
                "output_dir": str(self.output_dir),
            }
            if self.dist.is_rank0:
                (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            for cb in self.callbacks:
                cb.on_train_end(self, summary, error)
        return summary

    def _add_throughput(self, metrics: dict[str, float], step_seconds: float) -> None:
        metrics[f"{self.unit}_per_s"] = self.tokens_per_step / step_seconds
        metrics["tflops"] = metrics[f"{self.unit}_per_s"] * self.flops_per_token / 1e12
        if self.peak_tflops:
            metrics["mfu"] = metrics["tflops"] / self.peak_tflops
        metrics["data_wait_pct"] = 100 * metrics.pop("data_wait_s") / step_seconds
        metrics["peak_mem_gb"] = peak_memory_gb(self.dist.device)
