"""Scaling-law fits for a ladder: does the EBT's loss fall faster with data than the AR baseline's?

    ebwm-fit --ladder nlp_tiny_cpu --runs-dir runs/ladders/nlp_tiny_cpu --out docs/results/nlp_tiny_cpu
    ebwm-fit --ladder nlp_paper --tracking-uri http://127.0.0.1:5000 --experiment ladder-nlp_paper --out ... --mlflow

Per model kind, the final eval loss of every finished run is fitted with L(N, D) = E + A / N^a + B / D^b (N
parameters, D tokens or frames seen) by minimising a Huber loss of the log residuals, Chinchilla style (many
starts, L-BFGS). Bootstrap resamples of the runs give 95 % intervals for b and for the ratio b_EBT / b_AR, the
"data-scaling rate" the EBT paper compares (+36 % there). Also, per size, a power law L = c D^-s in D alone, and
the compute-optimal frontier of each fitted surface (for a FLOP budget C, the N and D = C / (flops per token) that
minimise L). A fit needs at least 6 runs with 2 sizes and 2 budgets per kind; with fewer, it says so and fits
nothing. Writes summary.json, summary.md, loss_vs_data.png and loss_vs_flops.png.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from ebwm_scale.errors import UserError, at_least, run_cli

HUBER_DELTA = 1e-3
MIN_POINTS, MIN_SIZES, MIN_BUDGETS = 6, 2, 2


LOG_FLOOR = -50.0


class FitError(UserError, ValueError):
    """Too few or unusable points for the requested fit."""


@dataclass(frozen=True)
class RunPoint:
    run: str
    kind: str
    size: str
    params: float
    data: float  # tokens or frames seen
    flops: float
    loss: float


@dataclass(frozen=True)
class SurfaceFit:
    """L(N, D) = E + A / N^a + B / D^b."""

    E: float
    A: float
    a: float
    B: float
    b: float

    def predict(self, params: float | np.ndarray, data: float | np.ndarray) -> np.ndarray:
        return self.E + self.A / np.asarray(params) ** self.a + self.B / np.asarray(data) ** self.b


def points_from_runs_dir(root: str | Path) -> list[RunPoint]:
    """Finished runs under `root` (each <run>/summary.json with a scale record and an eval loss)."""
    points = []
    for summary_path in sorted(Path(root).glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        scale = summary.get("scale")
        if summary.get("status") != "finished" or not scale or "eval_loss" not in summary:
            continue
        config = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        tags = config["tracking"]["tags"]
        points.append(
            RunPoint(
                summary["run"],
                tags.get("ladder_kind", scale["kind"]),
                tags.get("ladder_size", ""),
                scale["params"],
                scale["data"],
                scale["flops"],
                summary["eval_loss"],
            )
        )
    return points


def points_from_mlflow(tracking_uri: str, experiment: str, ladder: str) -> list[RunPoint]:
    """Finished runs of `experiment` tagged with the ladder's name; the loss is the last eval/loss."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FitError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.ladder = '{ladder}' and attributes.status = 'FINISHED'"
    )
    points = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if "eval/loss" not in metrics:
            continue
        data = float(tags["tokens"])
        flops = float(tags["flops"])
        points.append(
            RunPoint(
                run.info.run_name,
                tags.get("ladder_kind", tags["model_kind"]),
                tags.get("ladder_size", ""),
                float(tags["params"]),
                data,
                flops,
                metrics["eval/loss"],
            )
        )
    return points


def _log_prediction(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    e, log_a, a, log_b, b = theta
    return np.logaddexp(np.logaddexp(e, log_a - a * log_n), log_b - b * log_d)


def _huber(residual: np.ndarray) -> np.ndarray:
    small = np.abs(residual) <= HUBER_DELTA
    return np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))


def _minimise(points: list[RunPoint], starts: list[np.ndarray]) -> np.ndarray:
    from scipy.optimize import minimize

    log_n = np.log([p.params for p in points])
    log_d = np.log([p.data for p in points])
    log_l = np.log([p.loss for p in points])

    def objective(theta):
        return _huber(_log_prediction(theta, log_n, log_d) - log_l).sum()

    # Log-coefficients above LOG_FLOOR: a floor E the data do not need goes to e^-50 instead of underflowing to 0.
    bounds = [(LOG_FLOOR, None), (LOG_FLOOR, None), (0.0, 3.0), (LOG_FLOOR, None), (0.0, 3.0)]
    best = min((minimize(objective, start, method="L-BFGS-B", bounds=bounds) for start in starts), key=lambda r: r.fun)
    return best.x


def check_enough(points: list[RunPoint], kind: str) -> None:
    sizes, budgets = {p.params for p in points}, {p.data for p in points}
    if len(points) < MIN_POINTS or len(sizes) < MIN_SIZES or len(budgets) < MIN_BUDGETS:
        raise FitError(
            f"{kind}: {len(points)} finished runs over {len(sizes)} sizes and {len(budgets)} budgets; L(N, D) has 5 "
            f"parameters and needs at least {MIN_POINTS} runs, {MIN_SIZES} sizes and {MIN_BUDGETS} budgets"
        )


def fit_surface(points: list[RunPoint], start: np.ndarray | None = None) -> SurfaceFit:
    """The Huber-in-log-space fit of L(N, D); from a grid of starts, or from `start` (bootstrap refits)."""
    if start is not None:
        starts = [start]
    else:
        grid = np.meshgrid([-1.0, 0.5], [0.0, 6.0], [0.3, 0.7], [0.0, 6.0], [0.3, 0.7])
        starts = list(np.stack([g.ravel() for g in grid], axis=1))
    e, log_a, a, log_b, b = (float(v) for v in _minimise(points, starts))
    return SurfaceFit(E=math.exp(e), A=math.exp(log_a), a=a, B=math.exp(log_b), b=b)


def _theta(fit: SurfaceFit) -> np.ndarray:
    return np.array([math.log(fit.E), math.log(fit.A), fit.a, math.log(fit.B), fit.b])


def bootstrap(points: list[RunPoint], fit: SurfaceFit, samples: int, seed: int) -> list[SurfaceFit]:
    """Refits on resamples (with replacement) of the runs that still span 2 sizes and 2 budgets."""
    rng = np.random.default_rng(seed)
    fits: list[SurfaceFit] = []
    while len(fits) < samples:
        resample = [points[i] for i in rng.integers(0, len(points), len(points))]
        if len({p.params for p in resample}) >= MIN_SIZES and len({p.data for p in resample}) >= MIN_BUDGETS:
            fits.append(fit_surface(resample, start=_theta(fit)))
    return fits


def data_power_laws(points: list[RunPoint]) -> dict[str, dict[str, float]]:
    """Per size with >= 3 budgets: L = c * D^-s by least squares in log-log (exponent s, and the R^2)."""
    laws = {}
    for size in sorted({p.size for p in points}):
        at_size = [p for p in points if p.size == size]
        if len({p.data for p in at_size}) < 3:
            continue
        x, y = np.log([p.data for p in at_size]), np.log([p.loss for p in at_size])
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        r2 = 1 - residual.var() / y.var() if y.var() > 0 else 1.0
        laws[size] = {"exponent": float(-slope), "coefficient": float(math.exp(intercept)), "r2": float(r2)}
    return laws


def frontier(points: list[RunPoint], fit: SurfaceFit, num: int = 6) -> list[dict[str, float]]:
    """Compute-optimal (N, D, L) for budgets spanning the runs' FLOPs; FLOPs per token per parameter is taken from
    the runs (about linear in N for a given recipe)."""
    per_param_token = float(np.median([p.flops / (p.params * p.data) for p in points]))
    params = np.geomspace(min(p.params for p in points) / 4, max(p.params for p in points) * 4, 400)
    out = []
    for budget in np.geomspace(min(p.flops for p in points), max(p.flops for p in points), num):
        data = budget / (per_param_token * params)
        losses = fit.predict(params, data)
        best = int(np.argmin(losses))
        out.append(
            {
                "flops": float(budget),
                "params": float(params[best]),
                "data": float(data[best]),
                "loss": float(losses[best]),
            }
        )
    return out


def _interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


Fits = dict[str, tuple[SurfaceFit, list[SurfaceFit]]]  # kind -> (fit, bootstrap refits)


def analyse(points: list[RunPoint], samples: int = 200, seed: int = 0) -> tuple[dict, Fits]:
    """(what summary.json holds, the fits); kinds that cannot be fitted carry the reason instead of a fit."""
    points = sorted(points, key=lambda p: p.run)  # the same resamples whichever source listed the runs
    result: dict = {"runs": [asdict(p) for p in points], "kinds": {}}
    fits: Fits = {}
    for kind in sorted({p.kind for p in points}):
        kind_points = [p for p in points if p.kind == kind]
        entry: dict = {"runs": len(kind_points), "data_power_laws": data_power_laws(kind_points)}
        try:
            check_enough(kind_points, kind)
        except FitError as error:
            entry["not_fitted"] = str(error)
            result["kinds"][kind] = entry
            continue
        fit = fit_surface(kind_points)
        boots = bootstrap(kind_points, fit, samples, seed)
        fits[kind] = (fit, boots)
        entry["fit"] = asdict(fit)
        entry["b_interval"] = _interval([f.b for f in boots])
        entry["a_interval"] = _interval([f.a for f in boots])
        entry["frontier"] = frontier(kind_points, fit)
        result["kinds"][kind] = entry
    if "ar" in fits:
        ar, ar_boots = fits["ar"]
        for kind, (fit, boots) in fits.items():
            if kind == "ar":
                continue
            ratios = [e.b / r.b for e, r in zip(boots, ar_boots) if r.b > 0]
            result.setdefault("data_scaling_ratios", {})[kind] = {
                "over_ar": fit.b / ar.b if ar.b > 0 else float("inf"),
                "interval": _interval(ratios) if ratios else None,
            }
    return result, fits


def plot(points: list[RunPoint], result: dict, fits: Fits, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = sorted({p.kind for p in points} - {"ebt", "ar"})
    colors = {"ebt": "tab:red", "ar": "tab:blue", **dict(zip(others, ("tab:orange", "tab:green", "tab:purple")))}
    unit = "tokens or frames"
    figure, axis = plt.subplots(figsize=(7, 5))
    for kind in sorted({p.kind for p in points}):
        kind_points = [p for p in points if p.kind == kind]
        for size in sorted({p.size for p in kind_points}):
            at = sorted((p for p in kind_points if p.size == size), key=lambda p: p.data)
            axis.scatter([p.data for p in at], [p.loss for p in at], color=colors.get(kind), s=18)
            if kind in fits:
                fit, boots = fits[kind]
                grid = np.geomspace(at[0].data, at[-1].data, 50)
                axis.plot(grid, fit.predict(at[0].params, grid), color=colors.get(kind), lw=1, label=f"{kind} {size}")
                band = np.array([b.predict(at[0].params, grid) for b in boots])
                axis.fill_between(grid, *np.percentile(band, [2.5, 97.5], axis=0), color=colors.get(kind), alpha=0.15)
    axis.set(xscale="log", yscale="log", xlabel=f"data seen ({unit})", ylabel="eval loss", title="loss vs data")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "loss_vs_data.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 5))
    for kind in sorted({p.kind for p in points}):
        kind_points = [p for p in points if p.kind == kind]
        axis.scatter(
            [p.flops for p in kind_points], [p.loss for p in kind_points], color=colors.get(kind), s=18, label=kind
        )
        entry = result["kinds"][kind]
        if "frontier" in entry:
            line = entry["frontier"]
            axis.plot(
                [f["flops"] for f in line],
                [f["loss"] for f in line],
                color=colors.get(kind),
                lw=1,
                ls="--",
                label=f"{kind} compute-optimal fit",
            )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs (counted per step, every MCMC step included)",
        ylabel="eval loss",
        title="loss vs compute",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "loss_vs_flops.png", dpi=120)
    plt.close(figure)


def markdown(result: dict, ladder: str) -> str:
    lines = [f"# Scaling fit: {ladder}", "", f"{len(result['runs'])} finished runs.", ""]
    for kind, entry in result["kinds"].items():
        lines.append(f"## {kind.upper()} ({entry['runs']} runs)")
        if "fit" in entry:
            f, (b_lo, b_hi), (a_lo, a_hi) = entry["fit"], entry["b_interval"], entry["a_interval"]
            lines.append(
                f"L(N, D) = {f['E']:.3f} + {f['A']:.3g} / N^{f['a']:.3f} + {f['B']:.3g} / D^{f['b']:.3f}; "
                f"data exponent b = {f['b']:.3f} (95 % CI {b_lo:.3f} .. {b_hi:.3f}), "
                f"size exponent a = {f['a']:.3f} (CI {a_lo:.3f} .. {a_hi:.3f})"
            )
        else:
            lines.append(f"not fitted: {entry['not_fitted']}")
        for size, law in entry["data_power_laws"].items():
            lines.append(f"- size {size}: L = {law['coefficient']:.3g} D^-{law['exponent']:.3f} (R² {law['r2']:.3f})")
        lines.append("")
    for kind, ratio in result.get("data_scaling_ratios", {}).items():
        interval = ratio["interval"]
        shown = f" (95 % CI {interval[0]:.2f} .. {interval[1]:.2f})" if interval else ""
        lines.append(f"**Data-scaling rate, {kind.upper()} / AR: {ratio['over_ar']:.2f}{shown}.**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ebwm-fit", description=__doc__.splitlines()[0])
    parser.add_argument("--ladder", required=True, help="the ladder's name (tags.ladder of its runs)")
    parser.add_argument("--runs-dir", default="", help="read <dir>/<run>/summary.json instead of MLflow")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--experiment", default="", help="default ladder-<ladder>")
    parser.add_argument("--out", required=True, help="directory for summary.json, summary.md and the plots")
    parser.add_argument("--bootstrap", type=at_least(1), default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlflow", action="store_true", help="log the outputs as artifacts of a fit run")
    args = parser.parse_args(argv)
    experiment = args.experiment or f"ladder-{args.ladder}"
    points = (
        points_from_runs_dir(args.runs_dir)
        if args.runs_dir
        else points_from_mlflow(args.tracking_uri, experiment, args.ladder)
    )
    if not points:
        raise SystemExit(f"no finished runs of ladder {args.ladder} found")
    result, fits = analyse(points, args.bootstrap, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, result, fits, out)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    text = markdown(result, args.ladder)
    (out / "summary.md").write_text(text)
    print(text)
    if args.mlflow:
        import mlflow

        client = mlflow.MlflowClient(args.tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=f"fit-{args.ladder}", tags={"ladder": args.ladder, "fit": "1"})
        client.log_artifacts(run.info.run_id, str(out), artifact_path="scaling_fit")
        client.set_terminated(run.info.run_id)
        print(f"logged to MLflow run fit-{args.ladder} ({run.info.run_id}) in experiment {experiment}")


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
