"""End to end: the real dvc.yaml in a temporary git repo, `dvc repro units_it1` on a tiny demo corpus, real MLflow."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "demo": {"train_minutes": 1.5, "valid_minutes": 0.3, "abx_minutes": 0.3},
    "mfcc": {"num_shards": 3},
    "kmeans": {"k_it1": 20, "k": 30, "n_init": 1, "fit_fraction": 0.5},
    "train_it1": {"max_steps": 6, "warmup_steps": 2, "save_interval": 3, "log_interval": 2, "num_workers": 0},
    "train_it2": {"max_steps": 4, "warmup_steps": 1, "save_interval": 2, "log_interval": 2, "num_workers": 0},
    "iteration2": {"num_shards": 2},
}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src", "mlruns"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    run(["dvc", "repro", "units_it1"], root)
    return root


@pytest.mark.slow
def test_units_match_manifests_one_to_one_at_the_model_frame_rate(project):
    from hubert_pipeline.units import model_frames

    for split in ("train", "valid"):
        manifest = pl.read_csv(project / "outputs" / "manifests" / f"{split}.csv")
        units = pl.read_ndjson(project / "outputs" / "units" / "it1" / f"{split}.jsonl")
        assert units["fileid"].to_list() == manifest["fileid"].to_list()
        for n, u in zip(units["num_samples"], units["units"], strict=True):
            assert len(u) == model_frames(n)
            assert 0 <= min(u) and max(u) < TINY["kmeans"]["k_it1"]


@pytest.mark.slow
def test_second_repro_runs_no_stage(project):
    out = run(["dvc", "repro", "units_it1"], project).stdout
    assert "Running stage" not in out
    assert "up to date" in out


@pytest.mark.slow
def test_dvc_metrics_show_lists_pnmi_and_inertia(project):
    out = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    data = out[""]["data"]
    units = data["metrics/units_it1.json"]["data"]
    assert 0 < units["valid"]["pnmi"] < 1
    assert 0 < units["train"]["phone_purity"] <= 1
    assert data["outputs/kmeans/it1/metrics.json"]["data"]["k"] == TINY["kmeans"]["k_it1"]


@pytest.mark.slow
def test_mlflow_holds_one_tagged_run_per_stage_with_its_metrics(project):
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == ["demo_corpus", "kmeans_it1", "manifest", "mfcc", "units_it1"]
    assert len(runs) == 5
    assert by_stage["kmeans_it1"].data.metrics["inertia"] > 0
    assert by_stage["kmeans_it1"].data.params["kmeans.k_it1"] == "20"
    assert by_stage["units_it1"].data.tags["iteration"] == "1"
    assert 0 < by_stage["units_it1"].data.metrics["valid_pnmi"] < 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(by_stage["kmeans_it1"].info.run_id)}
    assert {"centroids.safetensors", "metrics.json"} <= artifacts


@pytest.mark.slow
def test_changing_the_units_tolerance_reruns_only_the_units_stage(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["units"]["length_tolerance"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "units_it1"], project).stdout
    assert "Running stage 'units_it1'" in out
    for stage in ("demo_corpus", "manifest", "mfcc", "kmeans_it1"):
        assert f"Running stage '{stage}'" not in out
