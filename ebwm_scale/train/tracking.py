"""MLflow tracking: one run per training run, the resolved config as params and artifact, metrics by step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebwm_scale.train.callbacks import Callback

if TYPE_CHECKING:
    from ebwm_scale.train.trainer import Trainer

MLFLOW_PARAM_MAX_CHARS = 6000


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlruns/mlflow.db"  # a local store by default; `http://host:5000` for a server
    experiment: str = "ebwm-scale"
    tags: dict[str, str] = field(default_factory=dict)


def local_artifact_location(uri: str) -> str | None:
    """For a local sqlite store keep artifacts beside the database (MLflow would default to ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return (db_path.parent / "artifacts").resolve().as_uri()


class MLflowCallback(Callback):
    def __init__(self, cfg: TrackingConfig, is_rank0: bool, log_interval_steps: int):
        self.cfg = cfg
        self.is_rank0 = is_rank0
        self.log_interval_steps = log_interval_steps
        self.client = None
        self.run_id: str | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not self.is_rank0:
            return
        from mlflow import MlflowClient  # heavy import, only where tracking is on
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.cfg.uri)
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            artifacts = local_artifact_location(self.cfg.uri)
            experiment_id = self.client.create_experiment(self.cfg.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        tags = {**trainer.run_tags(), **self.cfg.tags}
        run = self.client.create_run(experiment_id, run_name=trainer.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX_CHARS]) for k, v in trainer.flat_config().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_artifact(self.run_id, str(trainer.output_dir / "config.yaml"))

    def _log(self, metrics: dict[str, float], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(prefix + k, float(v), timestamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.run_id and (step % self.log_interval_steps == 0 or step == trainer.max_steps):
            self._log(metrics, step, "train/")

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.run_id:
            self._log(metrics, step, "eval/")

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any], error: BaseException | None) -> None:
        if not self.run_id:
            return
        numeric = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        self._log(numeric, trainer.step, "final/")
        self.client.log_artifact(self.run_id, str(trainer.output_dir / "summary.json"))
        self.client.set_terminated(self.run_id, status="FINISHED" if error is None else "FAILED")
