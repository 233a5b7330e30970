"""The benchmark tools run end to end at toy sizes (their figures come from full-size runs, docs/benchmarks.md)."""

import json
import math
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


@pytest.mark.slow
def test_bench_memory_reports_plain_and_lean():
    out = _tool("tools/bench_memory.py", "--vocab-sizes", "2048", "--seq-len", "32", "--batch-size", "2", "--dim", "32")
    line = next(line for line in out.splitlines() if line.startswith("V=2048"))
    assert "plain peak" in line and "lean peak" in line and "plain / lean" in line
    losses = line.split("(loss ")[1].rstrip(")").split(" vs ")
    assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-5)  # same weights, batch and math


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


def test_bench_update_rule_reports_every_setting(tmp_path):
    result = tmp_path / "update_rule.json"
    settings = "probs:500:1:1500,logits:20:0.1:100"
    out = _tool(
        "tools/bench_update_rule.py",
        *("--vocab-sizes", "32,64", "--settings", settings, "--steps", "3", "--last", "2", "--init-batches", "2"),
        *("--dim", "16", "--num-heads", "2", "--seq-len", "8", "--batch-size", "2", "--warmup-steps", "1"),
        *("--log-every", "0", "--threads", "1", "--json", str(result)),
    )
    header = next(line for line in out.splitlines() if line.startswith("| V |"))
    assert "init step 1 | init step 2 | trained step 1 | trained step 2 | final alpha" in header
    table = [line for line in out.splitlines() if line.startswith("| 32 |") or line.startswith("| 64 |")]
    assert len(table) == 2 * 3  # two EBT settings and the AR reference per V
    rows = json.loads(result.read_text())["rows"]
    assert [(r["vocab_size"], r["rule"]) for r in rows] == [
        (v, rule) for v in (32, 64) for rule in ("probs", "logits", "ar")
    ]
    for row in rows:
        assert row["entropy_rate"] < row["unigram_entropy"] < row["ln_v"]  # the synthetic language is learnable
        if row["rule"] == "ar":
            assert row["init_loss_steps"] is None and len(row["final_loss_steps"]) == 1
            continue
        assert len(row["init_loss_steps"]) == len(row["final_loss_steps"]) == 2
        assert all(math.isfinite(x) for x in row["init_loss_steps"] + row["final_loss_steps"])
        assert row["final_alpha"] > 0 and row["skipped"] == 0


def test_the_shipped_corpus_is_what_its_tool_makes_from_this_python(tmp_path):
    """tools/make_text_corpus.py is the shipped corpus's source: on the Python that made it, it rebuilds the same
    content (same sha256 in the manifest)."""
    import platform

    from ebwm_scale.data import text

    shipped = json.loads((text.ASSETS / text.MANIFEST_FILE).read_text())
    if platform.python_version() != shipped["python"]:
        pytest.skip(f"the corpus was made by Python {shipped['python']}, this is {platform.python_version()}")
    _tool("tools/make_text_corpus.py", "--out", str(tmp_path))
    assert json.loads((tmp_path / text.MANIFEST_FILE).read_text()) == shipped
    assert len(text.corpus_documents(tmp_path)) == shipped[text.CORPUS_FILE]["documents"]
