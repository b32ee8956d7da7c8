"""A team's tracking server for real: PostgreSQL (Debian's postgresql, run as the system user postgres) behind
`mlflow server` on loopback, artifacts in a shared folder, started and stopped by scripts/tracking_server.sh; a
reduced demo logs to it over HTTP and the registry's aliases load from it."""

import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import SERVER_SCRIPT, tracking_server

REPO = Path(__file__).resolve().parents[1]
STAGES = ["demo_corpus", "manifest", "mfcc", "kmeans_it1", "units_it1", "pretrain_it1", "validate_it1"]
TINY = {
    "demo": {"train_minutes": 1.0, "valid_minutes": 0.3, "abx_minutes": 0.3},
    "kmeans": {"k_it1": 20, "n_init": 1, "fit_fraction": 0.5},
    "train_it1": {"max_steps": 4, "warmup_steps": 1, "save_interval": 2, "log_interval": 2, "num_workers": 0},
}

pytestmark = [pytest.mark.server, pytest.mark.slow]


def make_project(root: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], commit):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo up to validate_it1, logging to a tracking server on PostgreSQL: (project, server folder, URI)."""
    shared = tmp_path_factory.mktemp("shared") / "mlflow-artifacts"  # a lab: a folder on the shared file system
    with tracking_server(shared) as (uri, data):
        project = make_project(tmp_path_factory.mktemp("project"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
        out = subprocess.run(["dvc", "repro", "validate_it1"], cwd=project, env=env, capture_output=True, text=True,
                             check=False)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        mlflow.set_tracking_uri(uri)
        yield project, data, shared, uri


def postgres_count(data: Path, table: str) -> int:
    import psycopg2

    port = (data / "postgres.port").read_text().strip()
    password = (data / "postgres.password").read_text().strip()
    with psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=password, dbname="mlflow") as db:
        cursor = db.cursor()
        cursor.execute(f"SELECT count(*) FROM {table}")
        return cursor.fetchone()[0]


def test_every_stage_logs_to_postgresql_and_its_artifacts_land_in_the_shared_folder(demo):
    project, data, shared, _ = demo
    runs = {r.data.tags["stage"]: r for r in mlflow.search_runs(experiment_names=["hubert-pipeline"],
                                                                 output_format="list")}  # fmt: skip
    assert sorted(runs) == sorted(STAGES)
    assert postgres_count(data, "runs") == len(STAGES)  # the rows are in PostgreSQL, not in a file
    kmeans = runs["kmeans_it1"]
    artifacts = kmeans.info.artifact_uri or ""
    assert artifacts.startswith("mlflow-artifacts:/")  # uploaded through the server
    stored = shared / artifacts.removeprefix("mlflow-artifacts:/") / "centroids.safetensors"
    assert stored.read_bytes() == (project / "outputs/kmeans/it1/centroids.safetensors").read_bytes()
    assert not (project / "mlruns").exists()  # nothing in the checkout's default store
    inputs = mlflow.MlflowClient().get_run(runs["units_it1"].info.run_id).inputs
    assert inputs is not None
    assert {i.dataset.name for i in inputs.dataset_inputs} == {"train", "valid"}
    history = mlflow.MlflowClient().get_metric_history(runs["pretrain_it1"].info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4]
    assert "system/cpu_utilization_percentage" in runs["pretrain_it1"].data.metrics


def test_the_registry_alias_loads_through_from_pretrained_from_the_server(demo, monkeypatch):
    from hubert_pipeline.model import HuBERT

    project, _, _, uri = demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = HuBERT.from_pretrained("models:/hubert-pipeline@it1")
    local = HuBERT.from_pretrained(project / "outputs" / "pretrain" / "it1" / "best")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    version = mlflow.MlflowClient().get_model_version_by_alias("hubert-pipeline", "it1")
    assert {"train_run_id", "kmeans_run_id", "units_run_id", "checkpoint", "units"} <= set(version.tags)


def test_a_restarted_server_keeps_its_runs_and_the_script_reports_its_state(demo):
    _, data, _, uri = demo
    status = subprocess.run(["bash", SERVER_SCRIPT, "status", "--data", data], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert status.returncode == 0
    assert f"MLFLOW_TRACKING_URI={uri}" in status.stdout
    subprocess.run(["bash", SERVER_SCRIPT, "stop", "--data", data], check=True, capture_output=True)
    stopped = subprocess.run(["bash", SERVER_SCRIPT, "status", "--data", data], capture_output=True, check=False)
    assert stopped.returncode == 3
    again = subprocess.run(["bash", SERVER_SCRIPT, "start", "--data", data], capture_output=True, text=True,
                           check=True)  # fmt: skip
    assert f"MLFLOW_TRACKING_URI={uri}" in again.stdout  # the same port, database and artifacts
    assert len(mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list")) == len(STAGES)
