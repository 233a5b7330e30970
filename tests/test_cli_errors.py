"""Every console script answers a user error with one line, `Name: message` or a usage line, and exit code 2; a
traceback is for bugs (and for --debug). Before, each of these printed a traceback or went on silently."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

RECIPE = str(REPO / "recipes" / "ci_tiny.yaml")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _cases(tmp_path) -> list[tuple[list[str], str]]:
    """(arguments after `python`, what the one line says)."""
    listed = _write(tmp_path / "list.yaml", "- model\n- data\n")
    ladder = _write(
        tmp_path / "ladder.yaml", f'name: "a\\nb"\nbase: {RECIPE}\nsizes: {{s: {{dim: 32}}}}\nbudgets: [1]\n'
    )
    missing = str(tmp_path / "nothing")
    return [
        (["-m", "ebwm_scale.pretrain", listed], "ConfigError: recipe .* must be a YAML mapping"),
        (["-m", "ebwm_scale.pretrain", _write(tmp_path / "empty.yaml", "")], "ConfigError: recipe .* is empty"),
        (
            ["-m", "ebwm_scale.pretrain", _write(tmp_path / "env.yaml", "train:\n  output_dir: ${oc.env:NO_SUCH}\n")],
            "ConfigError: train.output_dir: .*NO_SUCH",
        ),
        (["-m", "ebwm_scale.pretrain", RECIPE, "train.device=cuda"], "LaunchError: train.device=cuda but torch sees"),
        (["-m", "ebwm_scale.pretrain", RECIPE, "parallel.tensor_parallel=3"], "ConfigError: parallel.tensor_parallel"),
        (
            ["-m", "ebwm_scale.cli.generate", missing, "--prompt", "x"],
            "CheckpointError: .* is not a complete checkpoint",
        ),
        (["-m", "ebwm_scale.cli.generate", missing, "--prompt", ""], "error: --prompt must not be empty"),
        (["-m", "ebwm_scale.cli.generate", missing, "--prompt", "x", "--best-of", "0"], "--best-of: 0 is less than 1"),
        (
            ["-m", "ebwm_scale.cli.generate", missing, "--prompt", "x", "--num-tokens", "0"],
            "--num-tokens: 0 is less than 1",
        ),
        (
            ["-m", "ebwm_scale.cli.generate", missing, "--prompt", "x", "--temperature", "-1"],
            "--temperature: -1 is less",
        ),
        (
            ["-m", "ebwm_scale.cli.evaluate", missing, "--out", missing, "--steps", "1,x"],
            "--steps: 'x' is not an integer",
        ),
        (["-m", "ebwm_scale.cli.evaluate", missing, "--out", missing, "--steps", "-2"], "--steps: -2 is less than 1"),
        (["-m", "ebwm_scale.cli.ladder", listed], "ConfigError: ladder .* must be a YAML mapping"),
        (["-m", "ebwm_scale.cli.ladder", ladder], r"ConfigError: name='a\\nb': names go into run names, paths and job"),
        (["-m", "ebwm_scale.cli.fit", "--ladder", "x", "--runs-dir", missing, "--out", missing], "error: no finished"),
        ([str(REPO / "tools" / "export.py"), missing, missing], "CheckpointError: .* is not a complete checkpoint"),
        (
            ["-m", "data_prep.cli", "text", "--input", listed, "--output", missing, "--vocab-size", "100000"],
            "error: sentencepiece cannot train this tokenizer: Vocabulary size too high",
        ),
    ]


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(tmp_path):
    failures = []
    for args, expected in _cases(tmp_path):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        if proc.returncode != 2 or "Traceback" in proc.stderr or not re.search(expected, lines[-1] if lines else ""):
            failures.append(f"{' '.join(args)} -> exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("how", ["--debug", "EBWM_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    listed = _write(tmp_path / "list.yaml", "- a\n")
    env = {"EBWM_DEBUG": "1"} if how.startswith("EBWM") else {}
    args = [listed, "--debug"] if how == "--debug" else [listed]
    proc = subprocess.run(
        [sys.executable, "-m", "ebwm_scale.pretrain", *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
