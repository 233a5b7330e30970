"""The benchmark tools run end to end at toy sizes (their figures come from full-size runs, docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _tool(*args: str, timeout: int = 600) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_memory_reports_plain_and_lean():
    out = _tool("tools/bench_memory.py", "--vocab-sizes", "2048", "--seq-len", "32", "--batch-size", "2", "--dim", "32")
    line = next(line for line in out.splitlines() if line.startswith("V=2048"))
    assert "plain peak" in line and "lean peak" in line and "plain / lean" in line
    losses = line.split("(loss ")[1].rstrip(")").split(" vs ")
    assert losses[0] == losses[1]  # same weights, same batch, same math


@pytest.mark.slow
def test_bench_gpu_runs_a_recipe_on_cpu(tmp_path):
    result = tmp_path / "bench.json"
    out = _tool(
        "tools/bench_gpu.py",
        "recipes/ci_tiny.yaml",
        "train.device=cpu",
        "data.seq_len=32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(result),
    )
    assert "EBT / AR:" in out
    measured = json.loads(result.read_text())
    assert measured["ebt"]["kind"] == "ebt" and measured["ar"]["kind"] == "ar"
    assert measured["ebt"]["tokens_per_s"] > 0 and measured["ar"]["tflops"] > 0
    assert "mfu" not in measured["ebt"]  # no known peak on a CPU: reported as n/a, never invented
