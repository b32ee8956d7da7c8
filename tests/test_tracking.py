import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from hubert_pipeline.params import MlflowParams
from hubert_pipeline.tracking import flatten, stage_run, tracking_uri


def test_default_uri_is_absolute_sqlite_under_the_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir("/")
    assert tracking_uri(MlflowParams()) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_environment_overrides_params_which_override_the_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(MlflowParams(tracking_uri="sqlite:////x.db")) == "http://127.0.0.1:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(MlflowParams(tracking_uri="sqlite:////x.db")) == "sqlite:////x.db"


def test_flatten_names_nested_params_with_dots():
    assert flatten({"kmeans": {"k": 5, "seed": 0}, "a": 1}) == {"kmeans.k": 5, "kmeans.seed": 0, "a": 1}


def test_stage_run_is_tagged_and_logs_params_and_metrics(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-day")
    with stage_run("kmeans_it1", mlflow_params=MlflowParams(experiment="t"), params={"kmeans": {"k": 7}}, iteration=1):
        mlflow.log_metric("inertia", 3.5)
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["stage"] == "kmeans_it1"
    assert run.data.tags["iteration"] == "1"
    assert run.data.tags["dvc_experiment"] == "sunny-day"
    assert run.data.tags["git_revision"]
    assert run.data.params == {"kmeans.k": "7"}
    assert run.data.metrics == {"inertia": 3.5}
    assert run.info.run_name == "kmeans_it1-sunny-day"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_stage_runs_reach_a_tracking_server_on_loopback(tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
            "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not answer /health in 90 s")
                time.sleep(1)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with stage_run("manifest", mlflow_params=MlflowParams(experiment="srv")):
            mlflow.log_metric("train_files", 3)
        runs = mlflow.search_runs(experiment_names=["srv"], output_format="list")
        assert [r.data.metrics["train_files"] for r in runs] == [3.0]
    finally:
        server.terminate()
        server.wait(30)
