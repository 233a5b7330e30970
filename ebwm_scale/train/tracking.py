"""MLflow tracking: one run per training run (continued across resumes), the resolved config as params and artifact,
metrics by step, system metrics. Nothing waits for the server: a background thread sends what the training loop
queues. A tracking server that is slow or down never stops training: calls fail fast, metrics are buffered and sent
when the server answers again (beyond a bound they are dropped and counted), and the run warns."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ebwm_scale.logs import log
from ebwm_scale.schema import positive
from ebwm_scale.train.callbacks import Callback

if TYPE_CHECKING:
    from ebwm_scale.train.trainer import Trainer

MLFLOW_PARAM_MAX_CHARS = 6000
# Fail fast instead of MLflow's default of 7 retries with exponential backoff (minutes of a stalled step).
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True  # log params, metrics and artifacts to MLflow
    uri: str = "sqlite:///mlruns/mlflow.db"  # a local store by default; http://127.0.0.1:5000 for a server
    experiment: str = "ebwm-scale"  # the MLflow experiment the run goes to
    tags: dict[str, str] = field(default_factory=dict)  # e.g. ladder: nlp_tiny_cpu
    retry_interval_s: float = 30.0  # after a failed call, wait this long before trying the server again
    max_buffered_metrics: int = 100_000  # kept for a server that is down; beyond it the oldest are dropped (counted)
    close_timeout_s: float = 120.0  # at the end, wait this long for queued metrics and files to reach the server
    system_metrics_interval_s: float = 10.0  # sample CPU/GPU/memory/disk/network as system/* metrics; 0: off

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        return positive(self, "tracking", "max_buffered_metrics")


def local_artifact_location(uri: str) -> str | None:
    """For a local sqlite store keep artifacts beside the database (MLflow would default to ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return (db_path.parent / "artifacts").resolve().as_uri()


def unreachable_message(uri: str, error: str, metrics_file: Path) -> str:
    """The one loud line a run prints when its tracking server does not answer at start."""
    message = (
        f"MLflow tracking server {uri} is unreachable ({error}); training goes on and metrics go to "
        f"{metrics_file} (and to MLflow if it answers later)"
    )
    if urlparse(uri).hostname in ("127.0.0.1", "localhost", "::1"):
        message += (
            f". {uri} is this machine ({socket.gethostname()}): on a cluster, start cluster/mlflow_server.sh with a "
            "host the compute nodes reach and set tracking.uri=http://<that host>:<port> (cluster/README.md)"
        )
    return message


# MLflow 3 records what an experiment is for in this tag (model development, not GenAI). Which page the UI opens on is
# a per-browser choice (its GenAI / Model training switch), hence the ?workflowType link the run logs.
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
# The runs table's colour dot, which the chart view's points take: one colour per kind, so a ladder's scatter of final
# loss against tokens reads at a glance (grouping by kind would average each kind into one point).
RUN_COLOR_TAG = "mlflow.runColor"
KIND_COLORS = {"ar": "#d62728", "ebt": "#1f77b4"}
OTHER_KIND_COLORS = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def kind_color(kind: str) -> str:
    """A fixed colour per kind (ladder kinds such as ebt_logits get one of the others, by name)."""
    return KIND_COLORS.get(kind) or OTHER_KIND_COLORS[zlib.crc32(kind.encode()) % len(OTHER_KIND_COLORS)]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class MLflowCallback(Callback):
    """Rank 0 queues metrics and files; a background thread sends them, so a slow or absent server never holds a
    training step. At the end the run waits up to tracking.close_timeout_s for the queue to drain."""

    def __init__(self, cfg: TrackingConfig, is_rank0: bool, log_interval_steps: int):
        self.cfg = cfg
        self.is_rank0 = is_rank0
        self.log_interval_steps = log_interval_steps
        # mlflow's client, monitor and the trainer are set at train start, before the sender thread uses them
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed = False
        self.queue = threading.Condition()  # guards buffer, pending_files, in_flight, dropped
        self.buffer: list[Any] = []  # mlflow Metric entries not yet sent
        self.pending_files: list[str] = []
        self.in_flight = 0
        self.dropped = 0
        self.wake = threading.Event()
        self.closing = False
        self.final_status = "FINISHED"
        self.sender: threading.Thread | None = None
        self.system_monitor: Any = None
        # Used by the sender thread only:
        self.failures = 0
        self.next_attempt = 0.0
        self.trainer: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id or ""}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or None
        self.resumed = self.run_id is not None

    def _bound_buffer(self) -> None:
        """Drop the oldest metrics beyond max_buffered_metrics (either thread, holding self.queue)."""
        excess = len(self.buffer) - self.cfg.max_buffered_metrics
        if excess > 0:
            self.dropped += excess
            del self.buffer[:excess]

    # ---- the sender thread ----

    def _attempt(self, action, what: str) -> bool:
        """Run one MLflow call; on failure warn, back off for retry_interval_s and report False."""
        if time.monotonic() < self.next_attempt:
            return False
        try:
            action()
            return True
        except Exception as error:  # network, HTTP and MLflow errors alike: tracking must not kill training
            self.failures += 1
            self.next_attempt = time.monotonic() + self.cfg.retry_interval_s
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            if self.failures == 1 and self.run_id is None:  # unreachable from the start: say it where it is seen
                metrics_file = self.trainer.output_dir / "metrics.jsonl"
                log.warning(unreachable_message(self.cfg.uri, first_line, metrics_file))
            if self.failures == 1 or self.failures % 10 == 0:
                warnings.warn(
                    f"MLflow at {self.cfg.uri} failed to {what} ({first_line}); training continues, "
                    f"{len(self.buffer) + self.in_flight} metrics buffered, {self.dropped} dropped",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False

    def _start_run(self) -> None:
        from mlflow.entities import Param

        trainer = self.trainer
        if self.run_id:  # resumed: continue the same run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            artifacts = local_artifact_location(self.cfg.uri)
            experiment_id = self.client.create_experiment(
                self.cfg.experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}
            )
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        kind = self.cfg.tags.get("ladder_kind") or trainer.cfg.model.kind
        tags = {**trainer.run_tags(), "mlflow.source.git.commit": git_commit(), RUN_COLOR_TAG: kind_color(kind)}
        run = self.client.create_run(experiment_id, run_name=trainer.run_name, tags={**tags, **self.cfg.tags})
        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX_CHARS]) for k, v in trainer.cfg.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])
        self.run_id = run.info.run_id
        if self.cfg.uri.startswith("http"):
            page = f"{self.cfg.uri.rstrip('/')}/#/experiments/{experiment_id}"
            log.info(f"MLflow: run {page}/runs/{self.run_id}, experiment {page}?workflowType=machine_learning")
        with self.queue:
            self.pending_files.append(str(trainer.output_dir / "config.yaml"))

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk, network and (with nvidia-ml-py) GPU utilization and memory, as system/* metrics."""
        if self.cfg.system_metrics_interval_s <= 0 or self.system_monitor is not None:
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter per run
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system_monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval_s,
                resume_logging=self.resumed,
                tracking_uri=self.cfg.uri,
            )
            self.system_monitor.start()
        except Exception as error:  # e.g. psutil missing: the run's own metrics matter more
            log.warning(f"no MLflow system metrics: {type(error).__name__}: {error}")

    def _send(self, chunk: list[Any]) -> bool:
        sent = self._attempt(lambda: self.client.log_batch(self.run_id, metrics=chunk), "log")
        with self.queue:
            if not sent:
                self.buffer[:0] = chunk
                self._bound_buffer()
            self.in_flight = 0
            self.queue.notify_all()
        return sent

    def _flush(self) -> None:
        if self.run_id is None:
            if not self._attempt(self._start_run, "start the run"):
                return
            self._start_system_metrics()
        while True:
            with self.queue:
                chunk = self.buffer[:1000]  # MLflow's per-request metric limit
                del self.buffer[: len(chunk)]
                self.in_flight = len(chunk)
            if not chunk or not self._send(chunk):
                break
        while self.pending_files:
            path = self.pending_files[0]
            if not self._attempt(lambda path=path: self.client.log_artifact(self.run_id, path), "upload"):
                return
            with self.queue:
                self.pending_files.pop(0)
                self.queue.notify_all()

    def _send_until_closed(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            closing = self.closing
            if closing:
                self.next_attempt = 0.0  # one last try, whatever the back-off
            self._flush()
            if closing:
                if self.system_monitor is not None:
                    self.system_monitor.finish()
                if self.run_id:
                    self._attempt(lambda: self.client.set_terminated(self.run_id, self.final_status), "close the run")
                return

    # ---- the training thread ----

    def _log(self, metrics: dict[str, float], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        with self.queue:
            self.buffer += [Metric(prefix + k, float(v), timestamp, step) for k, v in metrics.items()]
            self._bound_buffer()
        self.wake.set()

    def wait_until_sent(self, timeout: float) -> bool:
        """Block until the run exists and everything queued so far reached the server (True), or `timeout`."""
        with self.queue:
            sent = self.queue.wait_for(
                lambda: self.run_id and not (self.buffer or self.pending_files or self.in_flight), timeout
            )
            return bool(sent)

    def on_train_start(self, trainer: Trainer) -> None:
        if not self.is_rank0:
            return
        from mlflow import MlflowClient  # heavy import, only where tracking is on

        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        self.trainer = trainer
        self.client = MlflowClient(tracking_uri=self.cfg.uri)
        self.sender = threading.Thread(target=self._send_until_closed, name="mlflow-sender", daemon=True)
        self.sender.start()
        self.wake.set()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.client and (step % self.log_interval_steps == 0 or step == trainer.max_steps):
            self._log(metrics, step, "train/")

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.client:
            self._log(metrics, step, "eval/")

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any], error: BaseException | None) -> None:
        sender = self.sender
        if not self.client or sender is None:  # not rank 0, or tracking never started
            return
        scale = {f"scale_{k}": v for k, v in summary["scale"].items()}  # final/scale_params etc.: plottable axes
        numeric = {k: v for k, v in {**summary, **scale}.items() if isinstance(v, int | float)}
        with self.queue:
            self.pending_files.append(str(trainer.output_dir / "summary.json"))
        self._log(numeric, trainer.step, "final/")
        self.final_status = "FAILED" if error else ("KILLED" if trainer.stop_requested else "FINISHED")
        self.closing = True  # after everything is queued: the sender's last pass sends it all
        self.wake.set()
        sender.join(self.cfg.close_timeout_s)
        with self.queue:
            unsent, dropped = len(self.buffer) + self.in_flight, self.dropped
        if sender.is_alive():
            log.warning(
                f"MLflow at {self.cfg.uri} still busy after tracking.close_timeout_s={self.cfg.close_timeout_s:g} s; "
                "the run ends without waiting for it"
            )
        if unsent or dropped or self.run_id is None:
            warnings.warn(
                f"MLflow at {self.cfg.uri}: {unsent + dropped} metrics were never logged "
                f"({dropped} dropped beyond tracking.max_buffered_metrics, {unsent} still buffered; "
                "all are in metrics.jsonl)",
                RuntimeWarning,
                stacklevel=2,
            )
