"""Retake docs/mlflow_compare_demo.png: MLflow's chart view comparing iteration 1 with iteration 2 of one pipeline run.

After `bash run.sh demo`, with Debian's Chromium (`apt-get install chromium chromium-driver`):

    uv run python docs/mlflow_screenshot.py --tracking-uri sqlite:///$PWD/mlruns/mlflow.db \\
        --out docs/mlflow_compare_demo.png

It starts `mlflow server` on a free loopback port against the store (`--tracking-uri`, default the project's store
as the stages find it), waits until it answers, opens the experiment's chart view in headless Chromium with the runs
below and the charts of CHARTS only, the UI's optional panels closed (assistant, navigation, run list, chart
toolbars), takes the screenshot, adds a legend strip (one colour per iteration) and stops the server, also on error.

Runs: for each stage of STAGES, the newest finished run of the newest DVC experiment (tag `dvc_experiment`; "" is
the workspace) that has them all; `--dvc-experiment NAME` picks the experiment, `--run STAGE=RUN_ID` one run.
The stages of both iterations log the same metric keys (`train_loss`, `valid_accuracy`, `abx_across`, ...), so each
chart draws iteration 1 and iteration 2 together; unit_quality logs `units_*` with step 0 (MFCC), 1 and 2.
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("mlflow_screenshot")

STAGES = ("pretrain_it1", "pretrain_it2", "validate_it1", "validate_it2", "abx_it1", "abx_it2", "unit_quality")


@dataclass(frozen=True)
class Chart:
    metric: str
    what: str  # for the README's caption and --help


CHARTS = (  # x axis: training step, checkpoint step, layer, or the iteration whose units (0 = MFCC at kmeans.k)
    Chart("train_loss", "pretrain_itN: training loss per step"),
    Chart("train_accuracy", "pretrain_itN: masked-prediction accuracy on the training batches per step"),
    Chart("valid_loss", "validate_itN: validation loss per checkpoint"),
    Chart("valid_accuracy", "validate_itN: validation masked accuracy per checkpoint"),
    Chart("abx_within", "abx_itN: ABX error within speakers (%) per layer"),
    Chart("abx_across", "abx_itN: ABX error across speakers (%) per layer"),
    Chart("units_pnmi", "unit_quality: PNMI of the units at kmeans.k, x = 0 MFCC, 1 and 2 each model's best layer"),
    Chart("units_phone_purity", "unit_quality: phone purity of the same units"),
    Chart("units_abx_across", "unit_quality: ABX across speakers (%) of MFCC and each model's best layer"),
)
COLOURS = {"1": "#077a9d", "2": "#d9480f", None: "#5f6b7a"}  # iteration 1, iteration 2, both (unit_quality)
HIDE_JS = """
const style = document.createElement('style'); style.textContent = arguments[0]; document.head.appendChild(style);
for (const name of document.querySelectorAll(arguments[1] + ' svg + span')) name.parentElement.parentElement.remove();
"""  # the CSS, and the charts' legends (they name the first runs of the table, not the runs drawn)
HIDE = ".modebar-container, .modebar, [data-assistant-ui] { display: none !important; }"  # toolbars, assistant


def select_runs(
    uri: str, experiment: str, dvc_experiment: str | None, overrides: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """(MLflow experiment id, stage → run id): the newest finished run of each stage of one DVC experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"{uri}: no MLflow experiment {experiment!r} (run the pipeline first: bash run.sh demo)")
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    by_experiment: dict[str, dict[str, str]] = {}  # newest experiment first (runs are sorted newest first)
    for run in runs:
        if run.data.tags.get("stage") not in STAGES:
            continue
        stages = by_experiment.setdefault(run.data.tags.get("dvc_experiment", ""), {})
        stages.setdefault(run.data.tags["stage"], run.info.run_id)
    if dvc_experiment is None:
        complete = [name for name, stages in by_experiment.items() if set(STAGES) <= stages.keys() | overrides.keys()]
        dvc_experiment = complete[0] if complete else next(iter(by_experiment), "")
    chosen = by_experiment.get(dvc_experiment, {}) | overrides
    if missing := [s for s in STAGES if s not in chosen]:
        logger.warning("DVC experiment %r has no finished run of %s", dvc_experiment, ", ".join(missing))
    logger.info("DVC experiment %r: %s", dvc_experiment or "(workspace)", chosen)
    return found.experiment_id, chosen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(uri: str, timeout: float) -> Generator[str]:
    """`mlflow server` on a free loopback port, answering /health; stopped (its process group) on exit."""
    port = free_port()
    artifacts = tempfile.mkdtemp(prefix="mlflow-screenshot-")  # only read metrics: nothing is uploaded here
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--artifacts-destination", artifacts]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115  closed below, after the server
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"mlflow server exited ({server.returncode}):\n{log.read().decode()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # noqa: S310  loopback http
                if response.status == 200:  # noqa: PLR2004
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not answer on {url} within {timeout:.0f} s")
            time.sleep(1)
        logger.info("mlflow server on %s", url)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        shutil.rmtree(artifacts, ignore_errors=True)


def _uuid(i: int) -> str:
    return f"shot{i:04d}chart"


def line_chart(i: int, metric: str, section: str) -> dict[str, Any]:
    """A chart card of MLflow's chart view: one metric against its step, a line per run or group."""
    return {
        "uuid": _uuid(i), "type": "LINE", "metricSectionId": section, "deleted": False, "isGenerated": False,
        "displayName": metric, "metricKey": metric, "selectedMetricKeys": [metric], "runsCountToCompare": 10,
        "lineSmoothness": 0, "xAxisKey": "step", "xAxisScaleType": "linear", "scaleType": "linear", "range": {},
        "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
        "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False,
    }  # fmt: skip


def ui_state(run_ids: list[str], other_metrics: list[str]) -> dict[str, Any]:
    """The experiment page's saved view (localStorage): these runs, and only CHARTS shown."""
    section = "shotsection"
    charts = [line_chart(i, chart.metric, section) for i, chart in enumerate(CHARTS)]
    for j, metric in enumerate(other_metrics):  # known to the page, so that it does not add a chart for each
        charts.append({"uuid": _uuid(len(CHARTS) + j), "type": "BAR", "runsCountToCompare": 10,
                       "metricSectionId": section, "deleted": True, "isGenerated": True, "displayName": metric,
                       "metricKey": metric})  # fmt: skip
    return {
        "searchFilter": run_filter(run_ids),
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_20_RUNS",
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": section,
                "name": "iteration 1 vs iteration 2",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "viewMaximized": True,
        "runListHidden": True,
        "isAccordionReordered": True,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def run_filter(run_ids: list[str]) -> str:
    return "attributes.run_id IN ({})".format(", ".join(f"'{r}'" for r in run_ids))


def metric_keys(uri: str, run_ids: list[str]) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return sorted({key for run_id in run_ids for key in client.get_run(run_id).data.metrics})


def browser(chromium: str, chromedriver: str, width: int, height: int, scale: float) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--force-device-scale-factor={scale}", "--lang=en-US"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


CARD = '[data-testid="experiment-view-compare-runs-card"]'
DRAWN = "return [...document.querySelectorAll(arguments[0])].filter(c => c.querySelector('svg.main-svg')"
DRAWN += " && !c.querySelector('[role=status]')).length"


def wait_for_charts(driver: Any, count: int, timeout: float) -> None:
    """Until `count` chart cards have drawn their plot and show no spinner."""
    deadline = time.monotonic() + timeout
    while (drawn := driver.execute_script(DRAWN, CARD)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {drawn} of {count} charts drawn within {timeout:.0f} s")
        time.sleep(1)


def run_colours(runs: dict[str, str]) -> dict[str, str]:
    """run id → colour: one per iteration (the stage name's `_itN`), another for unit_quality."""
    return {run_id: COLOURS[stage[-1] if stage.endswith(("_it1", "_it2")) else None] for stage, run_id in runs.items()}


def screenshot(url: str, experiment_id: str, runs: dict[str, str], charts_uri: str, out: Path, args: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser(args.chromium, args.chromedriver, args.width, args.height, args.scale)
    try:
        metrics = {"width": args.width, "height": args.height, "deviceScaleFactor": args.scale, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.set_page_load_timeout(args.timeout)
        driver.get(f"{url}/#/")  # same origin first, to write the saved view and close the optional panels
        run_ids = list(runs.values())
        logged = metric_keys(charts_uri, run_ids)
        if missing := [c.metric for c in CHARTS if c.metric not in logged]:
            logger.warning("no run logs %s: those charts are left out", ", ".join(missing))
        state = ui_state(run_ids, [m for m in logged if m not in {c.metric for c in CHARTS}])
        storage = {
            f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(state),
            "experimentRunColors": json.dumps(run_colours(runs)),
            "mlflow.assistant.panelOpen_v1": "false",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            "_mlflow_dark_mode_toggle_enabled": "false",
            "databricks-dark-mode-pref": "light",
        }
        for key, value in storage.items():
            driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, value)
        driver.get(f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        driver.refresh()
        wait_for_charts(driver, len(CHARTS) - len(missing), args.timeout)
        for toggle in driver.find_elements(By.CSS_SELECTOR, '[aria-label="Toggle sidebar"]'):
            toggle.click()  # the navigation: to its rail of icons
        driver.execute_script(HIDE_JS, HIDE, CARD)
        time.sleep(args.settle)
        left = driver.execute_script(
            "const m = document.querySelector('main'); return m ? m.getBoundingClientRect().left : 0"
        )
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    add_legend(png, int(left * args.scale), args.scale, out)


def add_legend(png: bytes, left: int, scale: float, out: Path) -> None:
    """The screenshot right of the navigation rail, under a legend strip: the colours of COLOURS, named."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    shot = Image.open(io.BytesIO(png)).convert("RGB")
    shot = shot.crop((left, 0, shot.width, shot.height))
    size = round(15 * scale)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        font = ImageFont.load_default(size)
    entries = [(COLOURS["1"], "iteration 1 (*_it1 runs)"), (COLOURS["2"], "iteration 2 (*_it2)"),
               (COLOURS[None], "unit_quality: x = 0 MFCC, 1 it1, 2 it2 (best layer, k = kmeans.k)")]  # fmt: skip
    strip = Image.new("RGB", (shot.width, round(2.4 * size)), "white")
    draw = ImageDraw.Draw(strip)
    x, y = size, strip.height // 2
    for colour, text in entries:
        draw.line((x, y, x + 2 * size, y), fill=colour, width=max(2, size // 4))
        x += round(2.5 * size)
        draw.text((x, y), text, fill="#11171c", font=font, anchor="lm")
        x += round(draw.textlength(text, font=font)) + 2 * size
    image = Image.new("RGB", (shot.width, strip.height + shot.height), "white")
    image.paste(strip, (0, 0))
    image.paste(shot, (0, strip.height))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and the defaults that are values (not None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--params", default="params.yaml", help="params file (its mlflow section)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the project's, found as the stages find it)")
    p.add_argument("--experiment", help="MLflow experiment (default: params mlflow.experiment)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("mlflow_compare_demo.png"), help="PNG to write")
    p.add_argument("--dvc-experiment", help="DVC experiment to show ('' = workspace; default: newest complete)")
    p.add_argument("--run", action="append", default=[], metavar="STAGE=RUN_ID", help="use this run for a stage")
    p.add_argument("--width", type=int, default=1040, help="browser window width, CSS pixels")
    p.add_argument("--height", type=int, default=1440, help="browser window height, CSS pixels")
    p.add_argument("--scale", type=float, default=2.0, help="device scale factor (2: sharp when zoomed)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the charts have drawn")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server and the page")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium", help="browser")
    p.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver", help="driver")
    args = p.parse_args()

    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.params import MlflowParams, load_params
    from hubert_pipeline.tracking import tracking_uri

    setup_logging()
    mlflow_params = load_params(args.params).mlflow if Path(args.params).is_file() else MlflowParams()
    uri = args.tracking_uri or tracking_uri(mlflow_params)
    overrides = dict(item.split("=", 1) for item in args.run)
    experiment_id, runs = select_runs(uri, args.experiment or mlflow_params.experiment, args.dvc_experiment, overrides)
    with mlflow_server(uri, args.timeout) as url:
        screenshot(url, experiment_id, runs, uri, args.out, args)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
