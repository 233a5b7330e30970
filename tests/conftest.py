from pathlib import Path

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.models import ModelConfig
from ebwm_scale.parallel.dist import DistInfo

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_model_config(kind: str = "ebt", modality: str = "text", **overrides) -> ModelConfig:
    fields = dict(kind=kind, modality=modality, vocab_size=32, frame_dim=8, dim=32, num_layers=2, num_heads=4)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_mcmc() -> MCMCConfig:
    return MCMCConfig(num_steps=2, alpha_init=5.0)


@pytest.fixture(scope="session")
def stdlib_jsonl(tmp_path_factory):
    """A small real-English corpus as JSONL files (600 stdlib docstrings over 3 files)."""
    import json

    from ebwm_scale.data.text import corpus_documents

    out = tmp_path_factory.mktemp("corpus")
    documents = [doc["text"] for doc in corpus_documents()[:600]]
    for index in range(3):
        with open(out / f"docs_{index}.jsonl", "w", encoding="utf-8") as f:
            for doc in documents[index::3]:
                f.write(json.dumps({"text": doc}) + "\n")
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_shards(stdlib_jsonl, ray_local, tmp_path_factory):
    """A dataset made by the real prep job: sentencepiece (vocab 512), seq_len 32, small shards and chunks."""
    from data_prep.text import TextPrepConfig, run

    cfg = TextPrepConfig(
        inputs=[f"{stdlib_jsonl}/*.jsonl"],
        output=str(tmp_path_factory.mktemp("shards")),
        vocab_size=512,
        seq_len=32,
        chunk_mb=0.05,
        shard_mb=0.05,
        val_percent=10,
    )
    run(cfg)
    return cfg


def kill_prep_job_after(command: list[str], output: Path, markers: int) -> int:
    """Start a prep job, SIGKILL it (driver and the Ray processes it started) once `markers` chunk markers exist in
    `output`, and return how many chunks were finished by then."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker_dir = output / "_chunks"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(marker_dir.glob("*.json"))) < markers:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # a Ray worker in its own session may still finish (atomically) the chunk it was on
    return len(list(marker_dir.glob("*.json")))
