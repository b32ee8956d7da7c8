"""The code of the registered units model (`models:/hubert-pipeline-units@itN`): MLflow "models from code".

This file is the model: `register_units_model` logs it with `python_model=<this file>` and the artifacts
`checkpoint` (model folder), `centroids` (safetensors) and `units_config` (JSON: layer, normalize); MLflow runs it
to load the model, so nothing is pickled. It needs `hubert_pipeline` importable where it is loaded (the
checkout's environment: `mlflow models serve --env-manager local`).

Input: a DataFrame with a column `audio`, each a base64-encoded audio file (any format FFmpeg reads; files of other
rates or channels are read at 16 kHz mono, as `--resample --downmix` do). Output: a DataFrame with `units` (ints,
50 per second) per row, and `durations` (frames per unit) with the param `deduplicate: true`. Over HTTP:
`{"dataframe_records": [{"audio": "<base64>"}], "params": {"deduplicate": true}}` → `{"predictions": [...]}`.
The model runs on the CPU unless `HUBERT_UNITS_DEVICE` says otherwise (`cuda`, `auto`).
"""

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class UnitsModel(PythonModel):
    # predict has no type hint on purpose: MLflow would read it as a second signature (ours is given at logging).
    # Without this MLflow warns of it each time it loads this file, in every stage that logs or loads the model.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from hubert_pipeline.unit_encoder import (
            CENTROIDS_ARTIFACT,
            CHECKPOINT_ARTIFACT,
            CONFIG_ARTIFACT,
            EncoderParts,
            UnitEncoder,
        )

        config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        parts = EncoderParts(context.artifacts[CHECKPOINT_ARTIFACT], int(config["layer"]),
                             context.artifacts[CENTROIDS_ARTIFACT], bool(config["normalize"]))  # fmt: skip
        self.encoder = UnitEncoder.load(parts, os.environ.get("HUBERT_UNITS_DEVICE", "cpu"))

    def _units(self, audio: bytes) -> Any:
        from hubert_pipeline.audio import AudioSource, load_audio

        with tempfile.NamedTemporaryFile(prefix="hubert-units-") as f:
            f.write(audio)
            f.flush()
            return self.encoder.units(load_audio(AudioSource(f.name, resample=True, downmix=True)))

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN001, ARG002
        import pandas as pd

        from hubert_pipeline.unit_encoder import deduplicate

        rows = []
        for encoded in model_input["audio"]:
            units = self._units(base64.b64decode(encoded))
            if (params or {}).get("deduplicate"):
                values, durations = deduplicate(units)
                rows.append({"units": values.tolist(), "durations": durations.tolist()})
            else:
                rows.append({"units": units.tolist()})
        return pd.DataFrame(rows)


mlflow.models.set_model(UnitsModel())
