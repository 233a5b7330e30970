"""MLflow on a real server (cluster/mlflow_server.sh on a free port), read back through the REST API."""

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from ebwm_scale.pretrain import main
from tests.conftest import REPO
from tests.distributed import free_port
from tests.test_training import SMALL

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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    store, port = tmp_path_factory.mktemp("mlflow"), free_port()
    proc = subprocess.Popen(
        [str(REPO / "cluster" / "mlflow_server.sh"), str(store), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield uri
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_run_on_a_real_server_continues_the_same_run_after_resume(mlflow_server, tmp_path):
    common = [
        *RUN,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=server-test",
        f"train.output_dir={tmp_path}",
        "tracking.tags.ladder=unit-test",
    ]
    main([*common, "train.max_steps=4"])
    main([*common, "train.max_steps=6", "train.resume=auto"])

    experiment = _get(mlflow_server, "experiments/get-by-name", experiment_name="server-test")["experiment"]
    request = urllib.request.Request(
        f"{mlflow_server}/api/2.0/mlflow/runs/search",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
    )
    with urllib.request.urlopen(request) as response:
        (run,) = json.loads(response.read())["runs"]  # the resumed run continued, no second run
    run_id = run["info"]["run_id"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FINISHED"
    assert tags["model_kind"] == "ebt" and tags["ladder"] == "unit-test" and len(tags["git_commit"]) >= 7
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
    }
    assert expected <= metric_keys, expected - metric_keys
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts


def test_training_survives_a_tracking_server_that_is_down(tmp_path, capfd):
    dead = f"http://127.0.0.1:{free_port()}"
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
    loud = [line for line in capfd.readouterr().err.splitlines() if "is unreachable" in line]
    assert len(loud) == 1, loud  # once, however often the retries fail
    assert f"WARNING: MLflow tracking server {dead} is unreachable" in loud[0]
    assert "metrics.jsonl" in loud[0] and "is this machine" in loud[0] and "tracking.uri=http://" in loud[0]
