"""The registered units model: pyfunc from code (no pickle), its predictions, the CLI on registry URIs, serving."""

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from test_encode import CPU, jsonl, make_encoder_parts, write_corpus

from hubert_pipeline.compat import local_source
from hubert_pipeline.encode import encode
from hubert_pipeline.params import MlflowParams
from hubert_pipeline.tracking import register_model, stage_run
from hubert_pipeline.unit_encoder import UnitEncoder, sha256_of
from hubert_pipeline.units_registry import register_units_model

NAME = "hubert-pipeline"
UNITS_URI = f"models:/{NAME}-units@it1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A store holding a tiny encoder as `hubert-pipeline@it1` (checkpoint) and `hubert-pipeline-units@it1`."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    parts = make_encoder_parts(root)
    with stage_run("register_units_it1", mlflow_params=MlflowParams()) as run:
        mlflow.log_artifacts(parts.checkpoint, artifact_path="model")
        register_model(run.info.run_id, "model", NAME, "it1", {"iteration": "1"})
        registered = register_units_model(parts, name=f"{NAME}-units", alias="it1", tags={"iteration": "1"})
    yield {"root": root, "uri": uri, "parts": parts, "registered": registered,
           "corpus": write_corpus(root / "wav")}  # fmt: skip
    patch.undo()


def test_registering_shows_none_of_mlflows_warnings_about_the_choices_we_made(tmp_path, monkeypatch, recwarn):
    """No type hint on predict (our signature is given), no pip in uv's environments: MLflow says nothing of either."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # ty: ignore[invalid-assignment]
    logger = logging.getLogger("mlflow.utils.environment")
    logger.addHandler(handler)
    try:
        with stage_run("register_units_it1", mlflow_params=MlflowParams()):
            registered = register_units_model(make_encoder_parts(tmp_path), name="quiet-units", alias="it1", tags={})
    finally:
        logger.removeHandler(handler)
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in records]
    assert registered["version"] == "1"
    assert not [m for m in said if "Add type hints" in m or "pip version" in m], said


def audio_frame(files: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"audio": [base64.b64encode(f.read_bytes()).decode() for f in files]})


def test_the_units_model_is_code_and_artifacts_with_a_signature_and_an_example_and_no_pickle(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    with local_source(UNITS_URI) as folder:
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        mlmodel = (folder / "MLmodel").read_text()
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "units_pyfunc.py" in mlmodel
    assert {"artifacts/units.json", "artifacts/centroids.safetensors", "artifacts/checkpoint/model.safetensors",
            "input_example.json"} <= files  # fmt: skip
    assert "signature" in mlmodel
    version = mlflow.MlflowClient().get_model_version_by_alias(f"{NAME}-units", "it1")
    assert version.tags["layer"] == str(registry["parts"].layer)
    assert version.tags["centroids_sha256"] == sha256_of(registry["parts"].centroids)


def test_pyfunc_predictions_are_the_clis_units(registry, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    files = sorted(registry["corpus"].iterdir())
    encode(registry["corpus"], tmp_path / "cli", model=UNITS_URI, execution=CPU)
    expected = jsonl(tmp_path / "cli" / "units.jsonl")
    model = mlflow.pyfunc.load_model(UNITS_URI)
    predicted = pd.DataFrame(model.predict(audio_frame(files)))
    assert [list(u) for u in predicted["units"]] == [expected[f.stem]["units"] for f in files]
    dedup = pd.DataFrame(model.predict(audio_frame(files[:1]), params={"deduplicate": True}))
    assert sum(dedup["durations"][0]) == len(expected[files[0].stem]["units"])


def test_the_cli_records_the_registry_version_and_a_checkpoint_uri_takes_its_units_models_layer(
    registry, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    meta = encode(registry["corpus"], tmp_path / "units", model=UNITS_URI, execution=CPU)
    assert meta["provenance"]["model_version"] == {"name": f"{NAME}-units", "alias": "it1",
                                                   "version": registry["registered"]["version"]}  # fmt: skip
    assert meta["provenance"]["centroids_sha256"] == sha256_of(registry["parts"].centroids)
    checkpoint = encode(registry["corpus"], tmp_path / "ckpt", model=f"models:/{NAME}@it1", execution=CPU)
    assert checkpoint["provenance"]["layer"] == registry["parts"].layer
    assert (tmp_path / "ckpt" / "units.jsonl").read_text() == (tmp_path / "units" / "units.jsonl").read_text()
    local = UnitEncoder.load(registry["parts"])
    assert local.units_of(registry["corpus"] / "utt000.wav").tolist() == jsonl(tmp_path / "units" / "units.jsonl")[
        "utt000"]["units"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_returns_the_clis_units_over_http(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    encode(registry["corpus"], tmp_path / "cli", model=UNITS_URI, execution=CPU)
    expected = jsonl(tmp_path / "cli" / "units.jsonl")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", UNITS_URI, "--env-manager", "local",
                               "-p", str(port), "-h", "127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /ping in 3 minutes"
                time.sleep(0.5)
        files = sorted(registry["corpus"].iterdir())[:2]
        records = audio_frame(files).to_dict(orient="records")
        answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": records})
        assert [p["units"] for p in answer["predictions"]] == [expected[f.stem]["units"] for f in files]
        dedup = post(f"http://127.0.0.1:{port}/invocations",
                     {"dataframe_records": records[:1], "params": {"deduplicate": True}})  # fmt: skip
        assert sum(dedup["predictions"][0]["durations"]) == len(expected[files[0].stem]["units"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and the uvicorn workers it started
        server.wait(timeout=30)
