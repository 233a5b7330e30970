"""The training loop: accumulate, all-reduce, clip, step, schedule, evaluate. Everything else is a callback."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ebwm_scale.data.sampler import SampleDataset, fixed_batches
from ebwm_scale.models.blocks import count_params
from ebwm_scale.parallel.dist import DistInfo, all_reduce_gradients, all_reduce_mean
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.metrics import train_flops_per_token
from ebwm_scale.train.optim import lr_at, set_lr

if TYPE_CHECKING:
    from ebwm_scale.config import PretrainConfig

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
EVAL_NOISE_SEED = 1234  # every eval starts the MCMC chains from the same noise, so evals are comparable


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 300  # optimizer steps
    grad_accum_steps: int = 1
    log_interval_steps: int = 10
    eval_interval_steps: int = 100  # 0: evaluate only at the end
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # bf16: autocast for the matmuls; the MCMC state and losses stay fp32
    output_dir: str = "runs"  # the run writes <output_dir>/<run_name>/{config.yaml,summary.json}
    run_name: str = ""  # default: the recipe's file name
    progress_bar: bool = True


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(
        self,
        cfg: PretrainConfig,
        objective: nn.Module,
        train_set: SampleDataset,
        val_set: SampleDataset,
        data_info: dict[str, str],
        dist: DistInfo,
        callbacks: list[Callback],
    ):
        self.cfg = cfg
        self.objective = objective
        self.val_set = val_set
        self.data_info = data_info
        self.dist = dist
        self.callbacks = callbacks
        self.optimizer = cfg.optim.build(objective, cfg.mcmc.alpha_lr_multiplier)
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.train_loader = cfg.data.build_loader(train_set, dist.rank, dist.world_size)
        self.step = 0
        self.max_steps = cfg.train.max_steps
        self.run_name = cfg.train.run_name
        self.output_dir = Path(cfg.train.output_dir) / self.run_name
        self.tokens_per_step = (
            cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * dist.world_size
        )
        self.num_params = count_params(objective)
        self.flops_per_token = train_flops_per_token(objective.model, cfg.model, cfg.data.seq_len, cfg.mcmc.num_steps)
        self.autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def describe(self) -> list[str]:
        c = self.cfg
        return [
            f"run {self.run_name}: {c.model.kind.upper()}-{c.model.modality}, {self.num_params:,} parameters, "
            f"{c.model.num_layers} layers x {c.model.dim} dim, {self.flops_per_token / 1e6:.1f} MFLOP/token",
            f"data: {', '.join(f'{k} {v}' for k, v in self.data_info.items())}; {self.tokens_per_step:,} tokens/step",
            f"device {self.dist.device}, {self.dist.world_size} rank(s), {c.train.precision}; "
            f"resolved config: {self.output_dir / 'config.yaml'}",
        ]

    def run_tags(self) -> dict[str, str]:
        c = self.cfg
        return {
            "model_kind": c.model.kind,
            "modality": c.model.modality,
            "params": str(self.num_params),
            "tokens": str(self.tokens_per_step * self.max_steps),
            "flops": f"{self.flops_per_token * self.tokens_per_step * self.max_steps:.4g}",
        }

    def flat_config(self) -> dict[str, object]:
        return self.cfg.flat()

    def train_step(self) -> dict[str, float]:
        lr = lr_at(self.step, self.cfg.optim, self.max_steps)
        set_lr(self.optimizer, lr)
        accum = self.cfg.train.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            batch = to_device(next(self.train_loader), self.dist.device)
            with self.autocast:
                out = self.objective(batch)
            (out.loss / accum).backward()
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float() / accum
        all_reduce_gradients(self.params, self.dist.world_size)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = all_reduce_mean({k: float(v) for k, v in sums.items()}, self.dist.world_size)
        metrics.update(grad_norm=float(grad_norm), lr=lr)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first eval_batches validation batches, MCMC chains started from fixed noise."""
        self.objective.eval()
        sums: dict[str, float] = {}
        num_batches = 0
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            torch.manual_seed(EVAL_NOISE_SEED + self.dist.rank)
            batches = fixed_batches(
                self.val_set,
                self.cfg.data.micro_batch_size,
                self.cfg.train.eval_batches,
                self.dist.rank,
                self.dist.world_size,
            )
            for batch in batches:
                with self.autocast:
                    result = self.objective.evaluate(to_device(batch, self.dist.device))
                for key, value in result.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                num_batches += 1
        self.objective.train()
        return all_reduce_mean({k: v / num_batches for k, v in sums.items()}, self.dist.world_size)

    def fit(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_rank0:
            (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml())
        for cb in self.callbacks:
            cb.on_train_start(self)
        start = time.perf_counter()
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        error: BaseException | None = None
        try:
            while self.step < self.max_steps:
                step_start = time.perf_counter()
                last_train = self.train_step()
                last_train["tokens_per_s"] = self.tokens_per_step / (time.perf_counter() - step_start)
                last_train["tflops"] = last_train["tokens_per_s"] * self.flops_per_token / 1e12
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
            elapsed = time.perf_counter() - start
            summary = {
                "run": self.run_name,
                "steps": self.step,
                "tokens": self.step * self.tokens_per_step,
                "wall_time_s": elapsed,
                "tokens_per_s": self.step * self.tokens_per_step / max(elapsed, 1e-9),
                "train_loss": last_train.get("loss", float("nan")),
                "eval_loss": last_eval.get("loss", float("nan")),
                "output_dir": str(self.output_dir),
            }
            if self.dist.is_rank0:
                (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            for cb in self.callbacks:
                cb.on_train_end(self, summary, error)
        return summary
