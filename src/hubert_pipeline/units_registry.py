"""Registering a unit encoder in MLflow: checkpoint + layer + centroids as one pyfunc model, "models from code".

The model's code is `units_pyfunc.py` (logged as a file, never pickled); its artifacts are the checkpoint folder,
the centroids and a JSON of the layer. Registered as `<name>-units` (`validate.registered_model` + `-units`) under
alias `itN`, beside the checkpoint-only `<name>@itN` that `HuBERT.from_pretrained` loads.
"""

import base64
import contextlib
import io
import json
import logging
import tempfile
import wave
from collections.abc import Generator
from pathlib import Path
from typing import Any

from hubert_pipeline.unit_encoder import (
    CENTROIDS_ARTIFACT,
    CHECKPOINT_ARTIFACT,
    CONFIG_ARTIFACT,
    UNITS_SUFFIX,
    EncoderParts,
    sha256_of,
)

MODEL_CODE = Path(__file__).with_name("units_pyfunc.py")
EXAMPLE_SECONDS, EXAMPLE_HZ, EXAMPLE_RATE = 0.5, 220.0, 16_000
PCM16_MAX = 32767


def example_wav() -> bytes:
    """Half a second of a 220 Hz tone, 16 kHz mono 16-bit WAV: the model's input example."""
    import numpy as np

    t = np.arange(int(EXAMPLE_SECONDS * EXAMPLE_RATE)) / EXAMPLE_RATE
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(EXAMPLE_RATE)
        w.writeframes((0.3 * np.sin(2 * np.pi * EXAMPLE_HZ * t) * PCM16_MAX).astype("<i2").tobytes())
    return buffer.getvalue()


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("string", "audio")]),  # base64 of an audio file
        outputs=Schema([ColSpec(Array("long"), "units"), ColSpec(Array("long"), "durations", required=False)]),
        params=ParamSchema([ParamSpec("deduplicate", "boolean", default=False)]),
    )


def requirements() -> list[str]:
    """What the model imports besides `hubert_pipeline` (the checkout's: serve with `--env-manager local`)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "torchaudio", "torchcodec", "spidr",
                                                    "safetensors", "numpy", "pandas")]  # fmt: skip


def _not_pip_version(record: logging.LogRecord) -> bool:
    return "Failed to resolve installed pip version" not in record.getMessage()


@contextlib.contextmanager
def _quiet_pip_version() -> Generator[None]:
    """uv's environments have no pip, of which MLflow warns when it writes the model's conda.yaml: the requirements
    are pinned (`requirements()`) and the model is served with `--env-manager local`, so the line is not shown."""
    logger = logging.getLogger("mlflow.utils.environment")
    logger.addFilter(_not_pip_version)
    try:
        yield
    finally:
        logger.removeFilter(_not_pip_version)


def register_units_model(parts: EncoderParts, *, name: str, alias: str, tags: dict[str, str]) -> dict[str, Any]:
    """Log the encoder as a pyfunc model in the active run, register it as `name`, point `alias` at it."""
    import mlflow
    import pandas as pd

    config = {"layer": parts.layer, "normalize": parts.normalize, "centroids_sha256": sha256_of(parts.centroids),
              "checkpoint_sha256": sha256_of(parts.checkpoint)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hubert-units-model-") as tmp, _quiet_pip_version():
        (Path(tmp) / "units.json").write_text(json.dumps(config, indent=2) + "\n")
        info = mlflow.pyfunc.log_model(
            name="units_model",
            python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: parts.checkpoint, CENTROIDS_ARTIFACT: parts.centroids,
                       CONFIG_ARTIFACT: str(Path(tmp) / "units.json")},
            signature=signature(),
            input_example=pd.DataFrame({"audio": [base64.b64encode(example_wav()).decode()]}),
            pip_requirements=requirements(),
            registered_model_name=name,
        )  # fmt: skip
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (tags | {"layer": str(parts.layer), "centroids_sha256": config["centroids_sha256"]}).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return {"name": name, "alias": alias, "version": version, "uri": f"models:/{name}@{alias}"} | config


def units_model_name(registered_model: str) -> str:
    return registered_model + UNITS_SUFFIX
