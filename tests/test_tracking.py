"""MLflow on a real server (cluster/mlflow_server.sh on a free port), read back through the REST API."""

import http.server
import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import pytest
import torch

from ebwm_scale.logs import setup_logging
from ebwm_scale.pretrain import main
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.tracking import MLflowCallback
from tests.conftest import REPO
from tests.distributed import free_port
from tests.helpers import SMALL

RUN = [
    str(REPO / "recipes" / "ci_tiny_video.yaml"),
    *SMALL,
    "tracking.enabled=true",
    "train.log_interval_steps=2",
    "data.micro_batch_size=4",
    "data.video.num_clips=64",
    "train.checkpoint_interval_steps=2",
]


def _get(uri: str, endpoint: str, **params) -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}") as response:
        return json.loads(response.read())


def _search_runs(uri: str, experiment_id: str) -> list[dict]:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/runs/search",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())["runs"]


def start_server(store, port: int) -> subprocess.Popen:
    """cluster/mlflow_server.sh on `store`, once it answers /health."""
    proc = subprocess.Popen(
        [str(REPO / "cluster" / "mlflow_server.sh"), str(store), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.mark.slow
def test_run_on_a_real_server_continues_the_same_run_after_resume(mlflow_server, tmp_path):
    common = [
        *RUN,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=server-test",
        f"train.output_dir={tmp_path}",
        "tracking.tags.ladder=unit-test",
        "tracking.system_metrics_interval_s=0.1",
    ]
    from mlflow import MlflowClient

    MlflowClient(mlflow_server).create_experiment("server-test")  # made elsewhere, untagged: the run tags it
    main([*common, "train.max_steps=4"])
    main([*common, "train.max_steps=6", "train.resume=auto"])

    experiment = _get(mlflow_server, "experiments/get-by-name", experiment_name="server-test")["experiment"]
    (run,) = _search_runs(mlflow_server, experiment["experiment_id"])  # the resumed run continued, no second run
    run_id = run["info"]["run_id"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FINISHED"
    assert tags["model_kind"] == "ebt" and tags["ladder"] == "unit-test"
    assert tags["mlflow.runColor"] == "#1f77b4"  # EBT blue in the runs table and its charts, AR red
    assert len(tags["mlflow.source.git.commit"]) >= 7  # MLflow's own tag: the UI shows it as the source version
    kind = {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    history = _get(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert sorted(m["step"] for m in history) == [2, 4, 6]
    metric_keys = {m["key"] for m in run["data"]["metrics"]}
    expected = {
        "train/loss",
        "train/loss_step0",
        "train/energy_first",
        "train/energy_last",
        "train/alpha",
        "train/grad_norm",
        "train/lr",
        "train/frames_per_s",
        "train/tflops",
        "train/data_wait_pct",
        "train/peak_mem_gb",
        "train/skipped_steps",
        "eval/loss",
        "final/steps",
        "final/scale_params",
        "final/scale_data",
        "final/scale_flops",
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
    }
    assert expected <= metric_keys, expected - metric_keys
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts


def test_training_survives_a_tracking_server_that_is_down(tmp_path, capfd):
    dead = f"http://127.0.0.1:{free_port()}"
    # Logging takes over warnings.showwarning the first time a process sets it up; done here, before pytest.warns
    # installs its recorder, so the test sees the warning whether or not an earlier test ran a training.
    setup_logging(rank=0)
    with pytest.warns(RuntimeWarning, match="training continues"):
        summary = main(
            [
                *RUN,
                f"tracking.uri={dead}",
                "train.max_steps=4",
                f"train.output_dir={tmp_path}",
                "tracking.retry_interval_s=0.1",
            ]
        )
    assert summary["steps"] == 4 and summary["status"] == "finished"
    loud = [line for line in capfd.readouterr().out.splitlines() if "is unreachable" in line]
    assert len(loud) == 1, loud  # once, however often the retries fail
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d rank 0: "  # a log line: time and rank
    assert re.match(stamp + f"WARNING: MLflow tracking server {dead} is unreachable", loud[0]), loud[0]
    assert "metrics.jsonl" in loud[0] and "is this machine" in loud[0] and "tracking.uri=http://" in loud[0]


class HeldServer:
    """The slowest server: a proxy in front of the real one that holds every request until release()."""

    def __init__(self, upstream: str):
        self.released = threading.Event()
        self.answered = 0
        held = self

        class Forward(http.server.BaseHTTPRequestHandler):
            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                held.released.wait()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                request = urllib.request.Request(upstream + self.path, body or None, headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload, kind = response.status, response.read(), response.headers["Content-Type"]
                except urllib.error.HTTPError as error:
                    status, payload, kind = error.code, error.read(), error.headers["Content-Type"]
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                held.answered += 1

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"


class ReleaseAtTheLastStep(Callback):
    def __init__(self, held: HeldServer):
        self.held = held
        self.answered_by_step: list[int] = []

    def on_step_end(self, trainer, step, metrics):
        self.answered_by_step.append(self.held.answered)
        if step == trainer.max_steps:
            self.held.released.set()


@pytest.mark.slow
def test_a_server_that_answers_nothing_until_the_end_never_holds_a_step(mlflow_server, tmp_path, monkeypatch):
    from ebwm_scale.config import load_config
    from ebwm_scale.parallel.dist import DistInfo
    from ebwm_scale.pretrain import build_trainer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # held requests wait: none fails
    held = HeldServer(mlflow_server)
    release = ReleaseAtTheLastStep(held)
    overrides = [f"tracking.uri={held.uri}", "tracking.experiment=held", "train.max_steps=6"]
    cfg = load_config(RUN[0], [*RUN[1:], *overrides, "train.log_interval_steps=1", f"train.output_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu")), [release]).fit()
    held.server.shutdown()
    assert release.answered_by_step == [0] * 6  # every step ran while the server had answered nothing
    assert not [w for w in caught if "MLflow" in str(w.message)], [str(w.message) for w in caught]
    experiment = _get(mlflow_server, "experiments/get-by-name", experiment_name="held")["experiment"]
    (run,) = _search_runs(mlflow_server, experiment["experiment_id"])
    history = _get(mlflow_server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="train/loss")
    assert sorted(m["step"] for m in history["metrics"]) == [1, 2, 3, 4, 5, 6] and run["info"]["status"] == "FINISHED"


class ServerOutage(Callback):
    """Stops the tracking server after step `down` has been logged and starts it again, on the same store and port,
    after step `up` (whose logging then fails: the server came back between two attempts)."""

    def __init__(self, store, port: int, down: int, up: int, proc: subprocess.Popen):
        self.store, self.port, self.down, self.up, self.proc = store, port, down, up, proc
        self.slowest_down_step = 0.0
        self.last = time.monotonic()

    def on_step_end(self, trainer, step, metrics):
        now = time.monotonic()
        if self.down < step <= self.up:  # the server is down: logging must not hold the step for a timeout
            self.slowest_down_step = max(self.slowest_down_step, now - self.last)
        if step == self.down:
            (tracking,) = [cb for cb in trainer.callbacks if isinstance(cb, MLflowCallback)]
            assert tracking.wait_until_sent(timeout=60), "steps before the outage never reached the server"
            stop_server(self.proc)
        if step == self.up:
            self.proc = start_server(self.store, self.port)
        self.last = time.monotonic()


def _train_through_an_outage(tmp_path, name: str, *overrides: str):
    from ebwm_scale.config import load_config
    from ebwm_scale.parallel.dist import DistInfo
    from ebwm_scale.pretrain import build_trainer

    store, port = tmp_path / f"store-{name}", free_port()
    outage = ServerOutage(store, port, down=5, up=15, proc=start_server(store, port))
    uri = f"http://127.0.0.1:{port}"
    cfg = load_config(
        REPO / "recipes" / "ci_tiny_ar.yaml",
        [*SMALL, "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=outage", "data.seq_len=16"]
        + ["train.max_steps=25", "train.log_interval_steps=1", "tracking.retry_interval_s=0.05"]
        + [f"train.output_dir={tmp_path / name}", *overrides],
    )
    try:
        build_trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu")), [outage]).fit()
        experiment = _get(uri, "experiments/get-by-name", experiment_name="outage")["experiment"]
        (run,) = _search_runs(uri, experiment["experiment_id"])
        history = _get(uri, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="train/loss")["metrics"]
        return sorted(int(m["step"]) for m in history), run["info"]["status"], outage.slowest_down_step
    finally:
        stop_server(outage.proc)


@pytest.mark.slow
def test_metrics_logged_while_the_server_was_down_arrive_when_it_returns(tmp_path):
    with pytest.warns(RuntimeWarning, match="training continues"):
        steps, status, slowest = _train_through_an_outage(tmp_path, "replay")
    assert steps == list(range(1, 26)) and status == "FINISHED"  # every step, the outage's included
    assert slowest < 5  # a refused connection fails fast (MLflow's client would otherwise retry for minutes)


@pytest.mark.slow
def test_a_full_buffer_drops_the_oldest_metrics_and_counts_them(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"metrics were never logged \((\d+) dropped beyond") as caught:
        steps, status, _ = _train_through_an_outage(tmp_path, "drop", "tracking.max_buffered_metrics=60")
    dropped = int(re.search(r"\((\d+) dropped", str(caught[-1].message)).group(1))
    assert status == "FINISHED" and dropped > 0
    assert set(range(1, 6)) | set(range(17, 26)) <= set(steps) and len(steps) < 25  # the outage's oldest are gone
