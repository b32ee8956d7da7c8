import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from hubert_pipeline.params import MlflowParams
from hubert_pipeline.tracking import code_digest, code_root, flatten, run_tags, stage_run, tracking_uri, tree_changes


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
    assert run.info.run_name == "sunny-day/kmeans_it1"
    assert run.data.tags["code_digest"] == code_digest(code_root())
    assert run.data.tags["git_dirty"] in {"true", "false"}


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
        start_new_session=True,  # its workers in one process group, stopped together
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
    finally:  # the server and its workers: SIGTERM, then SIGKILL if they linger (slow to stop under load)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


def commit_all(root):
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_code_digest_changes_with_any_library_or_stage_source_and_nothing_else(tmp_path):
    (tmp_path / "src" / "hubert_pipeline").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "src" / "hubert_pipeline" / "kmeans.py").write_text("K = 1\n")
    (tmp_path / "stages" / "kmeans.py").write_text("import hubert_pipeline\n")
    digest = code_digest(tmp_path)
    (tmp_path / "params.yaml").write_text("k: 2\n")
    assert code_digest(tmp_path) == digest
    (tmp_path / "stages" / "kmeans.py").write_text("import hubert_pipeline  # edited\n")
    assert code_digest(tmp_path) != digest


def test_tree_changes_sees_a_same_size_edit_made_in_the_second_of_the_commit(tmp_path):
    (tmp_path / "params.yaml").write_text("k: 4\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    commit_all(tmp_path)
    assert tree_changes(tmp_path) == []
    (tmp_path / "params.yaml").write_text("k: 5\n")  # same size, same mtime second: git's stat cache misses it
    (tmp_path / "notes.txt").write_text("edited, but not code or config\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "new.py").write_text("\n")
    assert tree_changes(tmp_path) == ["params.yaml", "stages/new.py"]


def test_run_tags_take_the_baseline_and_the_name_from_dvc_and_the_code_from_the_imported_checkout(monkeypatch):
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    monkeypatch.setenv("DVC_EXP_NAME", "k-500")
    tags = run_tags("units_it2", iteration=2)
    assert tags["git_revision"] == "abc123"
    assert tags["dvc_experiment"] == "k-500"
    assert tags["code_root"] == str(code_root())
    assert (code_root() / "src" / "hubert_pipeline" / "tracking.py").is_file()
    assert tags["iteration"] == "2"


OPEN_RUN = """
from hubert_pipeline.params import MlflowParams
from hubert_pipeline.tracking import stage_run
with stage_run("kmeans_it1", mlflow_params=MlflowParams(experiment="parallel")):
    pass
"""


@pytest.mark.slow
def test_parallel_experiments_can_create_a_new_sqlite_store_together(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns/mlflow.db"}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_RUN], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)


# --- the store every entry point reads: MLFLOW_TRACKING_URI, params, the checkout's sqlite store, else an error ---


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout of the pipeline (git work tree with dvc.yaml and params.yaml), with no store yet, and a process
    with no tracking URI set."""
    from mlflow.tracking._tracking_service import utils

    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("mlflow:\n  experiment: t\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    return root


def register_tiny_model(checkout, tmp_path, monkeypatch) -> None:
    """What validate_it1 does: a run in the checkout's default store with the model registered as @it1."""
    from mlflow.tracking._tracking_service import utils

    from hubert_pipeline.compat import save_native
    from hubert_pipeline.model import HuBERT, HubertConfig
    from hubert_pipeline.tracking import register_model

    monkeypatch.chdir(checkout)
    with stage_run("validate_it1", mlflow_params=MlflowParams(experiment="t")) as run:
        save_native(HuBERT(HubertConfig.preset("tiny")), tmp_path / "best")
        mlflow.log_artifacts(str(tmp_path / "best"), artifact_path="model")
        register_model(run.info.run_id, "model", "hubert-pipeline", "it1", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # stage_run set both: a fresh process has neither
    monkeypatch.setattr(utils, "_tracking_uri", None)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}


def compat_cli(cwd, env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hubert_pipeline.convert", "models:/hubert-pipeline@it1", "my_teacher"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def test_readme_compat_command_works_from_the_checkout_and_leaves_no_stray_database(checkout, tmp_path, monkeypatch):
    register_tiny_model(checkout, tmp_path, monkeypatch)
    result = compat_cli(checkout, clean_env())
    assert result.returncode == 0, result.stderr
    assert (checkout / "my_teacher" / "model.safetensors").is_file()
    (checkout / "sub").mkdir()
    assert compat_cli(checkout / "sub", clean_env()).returncode == 0  # from a subfolder of the checkout too
    assert not (checkout / "mlflow.db").exists()
    assert not (checkout / "sub" / "mlflow.db").exists()


def test_outside_a_checkout_the_cli_names_mlflow_tracking_uri_and_creates_nothing(checkout, tmp_path, monkeypatch):
    register_tiny_model(checkout, tmp_path, monkeypatch)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = compat_cli(outside, clean_env())
    assert result.returncode != 0
    assert "not inside a checkout of the pipeline" in result.stderr
    assert "set MLFLOW_TRACKING_URI" in result.stderr
    assert list(outside.iterdir()) == []
    env = clean_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{checkout}/mlruns/mlflow.db"}
    result = compat_cli(outside, env)
    assert result.returncode == 0, result.stderr
    assert (outside / "my_teacher" / "config.json").is_file()


def test_from_pretrained_reads_the_checkouts_registry(checkout, tmp_path, monkeypatch):
    from hubert_pipeline.model import HuBERT

    register_tiny_model(checkout, tmp_path, monkeypatch)
    model = HuBERT.from_pretrained("models:/hubert-pipeline@it1")
    assert model.config.encoder_num_layers > 0
    assert not (checkout / "mlflow.db").exists()


def test_reading_uri_order_and_errors(checkout, tmp_path, monkeypatch):
    from hubert_pipeline.tracking import TrackingStoreError, reading_uri

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingStoreError, match="set MLFLOW_TRACKING_URI"):
        reading_uri()
    monkeypatch.chdir(checkout)
    with pytest.raises(TrackingStoreError, match=rf"no MLflow store at {checkout}/mlruns/mlflow\.db: run the pipeline"):
        reading_uri()
    assert not (checkout / "mlruns").exists()  # nothing created
    (checkout / "params.yaml").write_text("mlflow:\n  tracking_uri: http://127.0.0.1:1\n")
    assert reading_uri() == "http://127.0.0.1:1"
    assert reading_uri(MlflowParams(tracking_uri="sqlite:////x.db")) == "sqlite:////x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////y.db")
    assert reading_uri() == "sqlite:////y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(checkout))  # inside a DVC stage: its root, wherever the process runs
    monkeypatch.chdir(tmp_path)
    assert reading_uri() == "http://127.0.0.1:1"
