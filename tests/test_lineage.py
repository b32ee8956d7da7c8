"""Lineage in MLflow, with real DVC and a real sqlite store: a pipeline shaped as ours (stages named as ours, each
logging through `stage_run`) whose stages write tiny files, so every hash can be checked against dvc.lock."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import DatasetInput

from hubert_pipeline.lineage import Lock, cache_dir, stage_deps

STAGE_SCRIPT = """
import json, sys, time
from pathlib import Path
import mlflow
from hubert_pipeline.params import MlflowParams
from hubert_pipeline.tracking import register_model, stage_run

stage, outputs = sys.argv[1], sys.argv[2:]
iteration = int(stage[-1]) if stage[-1].isdigit() else None
with stage_run(stage, mlflow_params=MlflowParams(experiment="lineage"), iteration=iteration) as run:
    for out in map(Path, outputs):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("fileid,num_samples\\n" + f"{out.name},{len(str(out))}\\n" if out.suffix == ".csv"
                       else json.dumps({"made_by": stage, "file": str(out)}) + "\\n")
    if stage.startswith("pretrain"):
        time.sleep(2)  # long enough for a system-metrics sample (interval set by the test)
    if stage.startswith("validate"):
        mlflow.log_text("model", "model/config.json")
        register_model(run.info.run_id, "model", "lineage-model", "it1", {"step": "2", "iteration": "1"})
"""

CHECKPOINTS = "outputs/pretrain/it1/checkpoints"
STAGES = {  # name: (outputs written, dvc.yaml deps, dvc.yaml outs)
    "manifest": (["outputs/manifests/train.csv", "outputs/manifests/valid.csv", "outputs/alignments/train.jsonl"], [],
                 ["outputs/manifests", "outputs/alignments"]),  # a folder's train.jsonl: alignments, not a dataset
    "mfcc": (["outputs/features/mfcc/train/0.npy", "outputs/features/mfcc/train/1.npy",
              "outputs/features/mfcc/valid/0.npy"], ["outputs/manifests"], ["outputs/features/mfcc"]),
    "kmeans_it1": (["outputs/kmeans/it1/centroids.safetensors"], ["outputs/features/mfcc/train"],
                   ["outputs/kmeans/it1/centroids.safetensors"]),
    "units_it1": (["outputs/units/it1/train.jsonl", "outputs/units/it1/valid.jsonl"],
                  ["outputs/manifests", "outputs/features/mfcc", "outputs/kmeans/it1/centroids.safetensors",
                   "outputs/alignments"],
                  ["outputs/units/it1"]),
    "pretrain_it1": ([f"{CHECKPOINTS}/step_00000001.pt", f"{CHECKPOINTS}/step_00000002.pt"],
                     ["outputs/units/it1/train.jsonl", "outputs/kmeans/it1/centroids.safetensors"], [CHECKPOINTS]),
    "validate_it1": (["outputs/pretrain/it1/best/config.json"], ["outputs/units/it1/valid.jsonl", CHECKPOINTS],
                     ["outputs/pretrain/it1/best"]),
}  # fmt: skip


def dataset_inputs(run_id: str) -> list[DatasetInput]:
    inputs = mlflow.MlflowClient().get_run(run_id).inputs
    assert inputs is not None
    return inputs.dataset_inputs


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    (root / "stage.py").write_text(STAGE_SCRIPT)
    spec = {
        name: {"cmd": " ".join([sys.executable, "stage.py", name, *written]), "deps": ["stage.py", *deps], "outs": outs}
        for name, (written, deps, outs) in STAGES.items()
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": spec}, sort_keys=False))
    (root / "params.yaml").write_text("mlflow:\n  experiment: lineage\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
    }
    (root / "mlruns").mkdir()
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], commit, ["dvc", "repro"]):
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (root / "repro.log").write_text(result.stdout + result.stderr)  # what the user saw of the stages
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["lineage"], output_format="list")
    return root, {r.data.tags["stage"]: r for r in runs}


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_every_run_is_tagged_with_the_hashes_dvc_lock_records_for_its_dependencies(project):
    root, runs = project
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage, run in runs.items():
        recorded = {d["path"]: d["md5"] for d in lock[stage]["deps"] if d["path"] != "stage.py"}
        tagged = {k.removeprefix("dvc_dep/"): v for k, v in run.data.tags.items() if k.startswith("dvc_dep/")}
        assert tagged == recorded, stage  # a file inside a folder output, a sub-folder's .dir hash, whole outputs
        assert run.data.tags["dvc_stage"] == stage
    assert runs["kmeans_it1"].data.tags["dvc_dep/outputs/features/mfcc/train"].endswith(".dir")


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_each_run_names_the_runs_of_the_stages_it_read_from(project):
    _, runs = project
    ids = {stage: run.info.run_id for stage, run in runs.items()}
    upstream = {stage: {k.removeprefix("upstream/"): v for k, v in run.data.tags.items() if k.startswith("upstream/")}
                for stage, run in runs.items()}  # fmt: skip
    assert upstream["manifest"] == {}
    assert upstream["kmeans_it1"] == {"mfcc": ids["mfcc"]}
    assert upstream["units_it1"] == {stage: ids[stage] for stage in ("manifest", "mfcc", "kmeans_it1")}
    assert upstream["validate_it1"] == {"units_it1": ids["units_it1"], "pretrain_it1": ids["pretrain_it1"]}
    centroids = "outputs/kmeans/it1/centroids.safetensors"
    assert runs["kmeans_it1"].data.tags[f"dvc_out/{centroids}"] == md5(project[0] / centroids)


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_the_manifests_a_run_reads_are_its_train_and_valid_datasets_with_dvcs_hash_as_digest(project):
    root, runs = project
    for stage, files in {"mfcc": ["outputs/manifests/train.csv", "outputs/manifests/valid.csv"],
                         "units_it1": ["outputs/manifests/train.csv", "outputs/manifests/valid.csv"],
                         "pretrain_it1": ["outputs/units/it1/train.jsonl"],
                         "validate_it1": ["outputs/units/it1/valid.jsonl"], "kmeans_it1": []}.items():  # fmt: skip
        inputs = dataset_inputs(runs[stage].info.run_id)
        logged = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["path"]) for i in inputs}
        assert logged == {(Path(f).name.split(".")[0], md5(root / f), f) for f in files}, stage
        contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
        assert contexts == {name: {"train": "training", "valid": "validation"}[name] for name in contexts}
        sources = {i.dataset.name: (i.dataset.source_type, json.loads(i.dataset.source)["uri"]) for i in inputs}
        assert sources == {Path(f).name.split(".")[0]: ("local", str(root / f)) for f in files}, stage


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_logging_the_manifests_shows_none_of_mlflows_warnings_about_sources_or_integer_columns(project):
    root, _ = project
    log = (root / "repro.log").read_text()
    assert "Running stage 'units_it1'" in log  # the stages' output is there
    for warning in ("can be interpreted in multiple ways", "Inferred schema contains integer column"):
        assert warning not in log


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_the_registered_version_names_its_training_units_and_kmeans_runs_and_its_checkpoint(project):
    root, runs = project
    version = mlflow.MlflowClient().get_model_version_by_alias("lineage-model", "it1")
    lock = Lock(root)
    assert version.tags["train_run_id"] == runs["pretrain_it1"].info.run_id
    assert version.tags["kmeans_run_id"] == runs["kmeans_it1"].info.run_id
    assert version.tags["units_run_id"] == runs["units_it1"].info.run_id
    assert version.tags["units"] == lock.outs["outputs/units/it1"][0]
    assert version.tags["checkpoint"] == f"{CHECKPOINTS}/step_00000002.pt"
    assert version.tags["checkpoint_md5"] == md5(root / CHECKPOINTS / "step_00000002.pt")
    assert version.tags["step"] == "2"


@pytest.mark.slow  # the project: six DVC stages, each a process importing MLflow
def test_training_and_feature_runs_log_system_metrics_and_the_manifest_run_does_not(project):
    _, runs = project
    assert "system/cpu_utilization_percentage" in runs["pretrain_it1"].data.metrics
    assert "system/system_memory_usage_megabytes" in runs["pretrain_it1"].data.metrics
    assert not any(k.startswith("system/") for k in runs["manifest"].data.metrics)


def test_the_cache_of_a_checkout_is_found_from_its_dvc_config(tmp_path):
    (tmp_path / ".dvc").mkdir()
    assert cache_dir(tmp_path) == tmp_path / ".dvc" / "cache"
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = x\n[cache]\n    dir = ../../shared/cache\n")
    assert cache_dir(tmp_path) == (tmp_path / ".." / "shared" / "cache").resolve()
    (tmp_path / ".dvc" / "config.local").write_text('[cache]\ndir = "/repo/.dvc/cache"\n')  # a queued experiment's
    assert cache_dir(tmp_path) == Path("/repo/.dvc/cache")


def test_stage_deps_resolve_params_the_way_dvc_does(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: x\n    deps:\n      - ${data.train}/\n      - a.py\n")
    (tmp_path / "params.yaml").write_text("data:\n  train: data/demo/train\n")
    assert stage_deps(tmp_path, "s") == ["data/demo/train", "a.py"]
    assert stage_deps(tmp_path, "missing") == []
