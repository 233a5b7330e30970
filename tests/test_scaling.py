"""Scaling-law fits: known exponents come back from synthetic losses, too few runs are refused, plots are PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from ebwm_scale.scaling import Point, analyse, markdown, plot

TRUE = {"ebt": (1.5, 400.0, 0.35, 600.0, 0.30), "ar": (1.6, 400.0, 0.35, 600.0, 0.22)}  # E, A, a, B, b


def synthetic_points(noise: float = 0.005, sizes=(1e5, 3e5, 1e6, 3e6), budgets=(1e6, 3e6, 1e7, 3e7)) -> list[Point]:
    rng = np.random.default_rng(0)
    points = []
    for kind, (e, a_coef, a, b_coef, b) in TRUE.items():
        for index, params in enumerate(sizes):
            for data in budgets:
                loss = (e + a_coef / params**a + b_coef / data**b) * np.exp(rng.normal(0, noise))
                points.append(
                    Point(f"{kind}-{params:g}-{data:g}", kind, f"s{index}", params, data, 6 * params * data, loss)
                )
    return points


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


# The EBT runs of the video_tiny_cpu ladder (run, size, parameters, frames, FLOPs, eval loss): a loss still falling
# fast, whose fitted floor E underflowed to 0 in a bootstrap refit and crashed the fit on log(0).
VIDEO_EBT_RUNS = [
    ("video_tiny_cpu-ebt-s1-11.2k", "s1", 110017, 11200, 35481600000.0, 0.28008879721164703),
    ("video_tiny_cpu-ebt-s1-22.4k", "s1", 110017, 22400, 70963200000.0, 0.25300684571266174),
    ("video_tiny_cpu-ebt-s1-44.8k", "s1", 110017, 44800, 141926400000.0, 0.16592516377568245),
    ("video_tiny_cpu-ebt-s1-89.6k", "s1", 110017, 89600, 283852800000.0, 0.10768783465027809),
    ("video_tiny_cpu-ebt-s2-11.2k", "s2", 226465, 11200, 72902860800.0, 0.26136673986911774),
    ("video_tiny_cpu-ebt-s2-22.4k", "s2", 226465, 22400, 145805721600.0, 0.2261035367846489),
    ("video_tiny_cpu-ebt-s2-44.8k", "s2", 226465, 44800, 291611443200.0, 0.15093692019581795),
    ("video_tiny_cpu-ebt-s2-89.6k", "s2", 226465, 89600, 583222886400.0, 0.0983329638838768),
    ("video_tiny_cpu-ebt-s3-11.2k", "s3", 609409, 11200, 199190118400.0, 0.25816402584314346),
    ("video_tiny_cpu-ebt-s3-22.4k", "s3", 609409, 22400, 398380236800.0, 0.20323999226093292),
    ("video_tiny_cpu-ebt-s3-44.8k", "s3", 609409, 44800, 796760473600.0, 0.12298869714140892),
    ("video_tiny_cpu-ebt-s3-89.6k", "s3", 609409, 89600, 1593520947200.0, 0.084940604865551),
]


def test_a_fit_whose_floor_goes_to_zero_stays_finite():
    points = [Point(run, "ebt", size, n, d, flops, loss) for run, size, n, d, flops, loss in VIDEO_EBT_RUNS]
    result, fits = analyse(points, samples=200)
    fit = result["kinds"]["ebt"]["fit"]
    assert 0 < fit["E"] < 1e-3 and 0 < fit["b"] < 3 and all(np.isfinite(result["kinds"]["ebt"]["b_interval"]))
