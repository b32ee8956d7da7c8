"""docs/mlflow_screenshot.py: which runs it shows, and (with Debian's chromium and chromium-driver) the picture."""

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "mlflow_screenshot.py"
spec = importlib.util.spec_from_file_location("mlflow_screenshot", SCRIPT)
assert spec is not None
assert spec.loader is not None
shot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shot)


def log_pipeline(client: MlflowClient, experiment_id: str, dvc_experiment: str, skip: tuple[str, ...] = ()) -> dict:
    """One run per stage of shot.STAGES, with the metrics the stages log (a few steps), as a pipeline run leaves."""
    runs = {}
    for stage in shot.STAGES:
        if stage in skip:
            continue
        name = f"{dvc_experiment}/{stage}" if dvc_experiment else stage
        run = client.create_run(experiment_id, run_name=name, tags={"stage": stage, "dvc_experiment": dvc_experiment})
        now = int(time.time() * 1000)
        metrics = [Metric(chart.metric, 1.0 / (step + 1), now, step) for chart in shot.CHARTS for step in range(3)]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)
        runs[stage] = run.info.run_id
    return runs


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("hubert-pipeline", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment_id


def test_the_newest_dvc_experiment_with_every_stage_is_shown_by_default(store):
    uri, client, experiment_id = store
    workspace = log_pipeline(client, experiment_id, "")
    newest_complete = log_pipeline(client, experiment_id, "exp-a")
    log_pipeline(client, experiment_id, "exp-b", skip=("abx_it2", "unit_quality"))  # newer, unfinished
    assert shot.select_runs(uri, "hubert-pipeline", None, {}) == (experiment_id, newest_complete)
    assert shot.select_runs(uri, "hubert-pipeline", "", {})[1] == workspace


def test_a_run_given_for_a_stage_replaces_the_chosen_one(store):
    uri, client, experiment_id = store
    workspace = log_pipeline(client, experiment_id, "")
    other = log_pipeline(client, experiment_id, "exp-a")
    _, runs = shot.select_runs(uri, "hubert-pipeline", "", {"pretrain_it2": other["pretrain_it2"]})
    assert runs == workspace | {"pretrain_it2": other["pretrain_it2"]}


def test_runs_of_one_iteration_share_a_colour():
    colours = shot.run_colours({"pretrain_it1": "a", "abx_it1": "b", "validate_it2": "c", "unit_quality": "d"})
    assert colours["a"] == colours["b"] != colours["c"] != colours["d"]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver")  # fmt: skip
def test_the_screenshot_is_a_png_of_the_chart_view(store, tmp_path):
    uri, client, experiment_id = store
    log_pipeline(client, experiment_id, "")
    out = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", uri, "--out", str(out), "--timeout", "300"],
                   check=True, timeout=900)  # fmt: skip
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 800
        assert image.height > 800
