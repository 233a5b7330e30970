"""Screenshot a scaling ladder's runs in the real MLflow UI: final eval loss against tokens, one colour per kind.

Why: a ladder's MLflow experiment should be comparable at a glance, and only the UI itself shows whether it is.
This drives MLflow's web UI in headless Chromium like a person would: it opens the experiment (and says whether
that lands on the runs page or on MLflow's GenAI pages), switches the runs view to charts, adds a scatter chart
(x final/scale_data, y final/eval_loss), enlarges it and saves a PNG. The colours are the runs' own: training sets
each run's `mlflow.runColor` tag by kind (AR red, EBT blue).

Needs a running MLflow server, `pip install playwright` and a system Chromium (`apt-get install chromium`); no
`playwright install` (it downloads its own browser).

    python tools/mlflow_ui_screenshot.py --uri http://127.0.0.1:5000 --experiment ladder-nlp_tiny_cpu \
        --out docs/img/ladder_charts.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

VIEWPORT = {"width": 1600, "height": 1000}


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def find_chromium(path: str | None) -> str:
    candidates = [path] if path else ["chromium", "chromium-browser", "google-chrome"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    fail(
        f"no Chromium found ({', '.join(candidates)}): `apt-get install chromium`, or pass --chromium PATH "
        "(`playwright install` does not work offline)"
    )


def ladder_runs(uri: str, experiment_name: str) -> tuple[str, dict[str, str]]:
    """The experiment's id and {run name: ladder kind} of its runs that have the chart's y metric."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down: say so now, not in minutes
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except Exception as error:
        fail(f"MLflow at {uri} does not answer: {str(error).splitlines()[0]}")
    if experiment is None:
        names = ", ".join(e.name for e in client.search_experiments())
        fail(f"no experiment {experiment_name!r} at {uri}; there are: {names}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    # A ladder names its kinds (ebt_logits is an EBT); a plain training run only has its model.kind.
    kinds = {
        r.info.run_name: r.data.tags.get("ladder_kind") or r.data.params.get("model.kind", "?")
        for r in runs
        if "final/eval_loss" in r.data.metrics
    }
    if not kinds:
        fail(f"experiment {experiment_name!r} has no finished runs (none logged final/eval_loss)")
    return experiment.experiment_id, kinds


def open_runs_page(page, uri: str, experiment_id: str) -> None:
    runs_view = page.locator('input[name="runs-view-mode"]')
    page.goto(f"{uri}/#/experiments/{experiment_id}")
    runs_view.or_(page.get_by_role("heading", name="Overview")).first.wait_for(state="attached")
    if runs_view.count():
        print("the experiment opens on its runs page")
        return
    print("note: the experiment opens on MLflow's GenAI overview, not its runs; switching to 'Model training'")
    # The URL the sidebar's GenAI / Model training switch navigates to (clicking it races the GenAI pages' popovers).
    page.goto(f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning")
    page.reload()  # a change of the hash alone does not always re-render the page
    runs_view.first.wait_for(state="attached")


def pick_axis(page, label: str, metric: str) -> None:
    field = page.get_by_test_id("experiment-view-compare-runs-config-field").filter(has_text=label)
    field.locator(".du-bois-light-select-selector").click()
    page.keyboard.type(metric)
    page.locator(".du-bois-light-select-item-option", has_text=metric).first.click()


def add_scatter(page, x: str, y: str) -> None:
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    # Charts plot only the first 10 runs of the table unless told otherwise; a ladder has more.
    page.get_by_test_id("experiment-view-runs-visibility-column-header").click()
    page.get_by_role("menuitemradio", name="Show all runs").click()
    assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if assistant.count():  # the assistant panel covers a third of the page
        assistant.click()
    # Charts come in sections by metric prefix: add the scatter to its x metric's ("final/..." to "final").
    header = page.get_by_test_id("experiment-view-compare-runs-section-header")
    header.filter(has=page.get_by_text(x.split("/")[0], exact=True)).get_by_test_id(
        "experiment-view-compare-runs-add-chart"
    ).click()
    page.get_by_test_id("experiment-view-compare-runs-chart-type-scatter").click()
    pick_axis(page, "X axis", x)
    pick_axis(page, "Y axis", y)
    page.get_by_test_id("experiment-view-compare-runs-chart-modal-confirm").click()
    # Show only the charts of the x metric, so the scatter comes to the top of the page.
    page.get_by_placeholder("Search metric charts").fill(x)
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text=f"{x} vs. {y}")
    card.wait_for()
    # Drag the card's corner (beside the card, in its resizable wrapper): the section's cards grow to two a row.
    card.hover()
    resizable = page.locator(".react-resizable").filter(has=card)
    handle = resizable.get_by_test_id("draggable-card-resize-handle").bounding_box()
    box = card.bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 2 * box["width"], box["y"] + 1.5 * box["height"], steps=10)
    page.mouse.up()
    card.scroll_into_view_if_needed()  # the search also matches longer names (final/tokens_per_s for final/tokens)
    card.locator(".js-plotly-plot .scatterlayer").wait_for()
    page.wait_for_timeout(1000)  # plotly animates the resize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", required=True, help="experiment name, e.g. ladder-nlp_tiny_cpu")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--chromium", help="Chromium executable (default: chromium on PATH)")
    parser.add_argument("--x", default="final/scale_data", help="x metric (default final/scale_data; or final/tokens)")
    parser.add_argument("--y", default="final/eval_loss", help="y metric")
    args = parser.parse_args()

    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        fail("playwright is not installed: pip install playwright")
    chromium = find_chromium(args.chromium)
    uri = args.uri.rstrip("/")
    experiment_id, kinds = ladder_runs(uri, args.experiment)
    print(f"{args.experiment}: {len(kinds)} finished runs, kinds {sorted(set(kinds.values()))}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(20_000)
        try:
            open_runs_page(page, uri, experiment_id)
            add_scatter(page, args.x, args.y)
        except PlaywrightError as error:
            # The UI changed or did not load: keep what it showed, to find the new selector.
            debug = args.out.with_suffix(".failed.png")
            page.screenshot(path=str(debug))
            fail(f"driving the MLflow UI failed ({str(error).splitlines()[0]}); the page as it was: {debug}")
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
