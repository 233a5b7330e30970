"""Scaling-law fits: known exponents come back from synthetic losses, too few runs are refused, plots are PNGs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ebwm_scale.cli.fit import RunPoint, analyse, markdown, plot

TRUE = {"ebt": (1.5, 400.0, 0.35, 600.0, 0.30), "ar": (1.6, 400.0, 0.35, 600.0, 0.22)}  # E, A, a, B, b


def synthetic_points(noise: float = 0.005, sizes=(1e5, 3e5, 1e6, 3e6), budgets=(1e6, 3e6, 1e7, 3e7)) -> list[RunPoint]:
    rng = np.random.default_rng(0)
    points = []
    for kind, (e, a_coef, a, b_coef, b) in TRUE.items():
        for index, params in enumerate(sizes):
            for data in budgets:
                loss = (e + a_coef / params**a + b_coef / data**b) * np.exp(rng.normal(0, noise))
                points.append(
                    RunPoint(f"{kind}-{params:g}-{data:g}", kind, f"s{index}", params, data, 6 * params * data, loss)
                )
    return points


@pytest.mark.slow
def test_the_fit_recovers_known_exponents_and_their_ratio():
    result, fits = analyse(synthetic_points(), samples=40)
    for kind, (_, _, a, _, b) in TRUE.items():
        fit = result["kinds"][kind]["fit"]
        assert fit["a"] == pytest.approx(a, abs=0.03) and fit["b"] == pytest.approx(b, abs=0.03), kind
        low, high = result["kinds"][kind]["b_interval"]
        assert low <= fit["b"] <= high
    assert result["data_scaling_ratios"]["ebt"]["over_ar"] == pytest.approx(0.30 / 0.22, abs=0.1)
    laws = result["kinds"]["ebt"]["data_power_laws"]
    assert set(laws) == {"s0", "s1", "s2", "s3"} and all(0 < law["exponent"] < 0.3 for law in laws.values())
    frontier = result["kinds"]["ar"]["frontier"]
    assert all(f["loss"] > 0 for f in frontier) and frontier[0]["loss"] > frontier[-1]["loss"]
    json.dumps(result)  # summary.json is plain JSON


def test_too_few_runs_are_refused_with_the_reason():
    points = synthetic_points(sizes=(1e5,), budgets=(1e6, 3e6, 1e7))
    result, fits = analyse(points, samples=10)
    assert not fits and "data_scaling_ratios" not in result
    for entry in result["kinds"].values():
        assert "fit" not in entry and "needs at least 6 runs, 2 sizes and 2 budgets" in entry["not_fitted"]
    text = markdown(result, "tiny")
    assert "not fitted" in text and "Data-scaling rate" not in text


def test_plots_are_valid_pngs(tmp_path):
    points = synthetic_points()
    result, fits = analyse(points, samples=10)
    plot(points, result, fits, tmp_path)
    for name in ("loss_vs_data.png", "loss_vs_flops.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 400


# The EBT runs of the video_tiny_cpu ladder (docs/results/video_tiny_cpu): a loss still falling fast, whose fitted
# floor E underflowed to 0 in a bootstrap refit and crashed the fit on log(0).
VIDEO_EBT_RUNS = Path(__file__).parent / "assets" / "video_ebt_runs.json"


@pytest.mark.slow
def test_a_fit_whose_floor_goes_to_zero_stays_finite():
    points = [RunPoint(kind="ebt", **run) for run in json.loads(VIDEO_EBT_RUNS.read_text())]
    result, fits = analyse(points, samples=200)
    fit = result["kinds"]["ebt"]["fit"]
    assert 0 < fit["E"] < 1e-3 and 0 < fit["b"] < 3 and all(np.isfinite(result["kinds"]["ebt"]["b_interval"]))
