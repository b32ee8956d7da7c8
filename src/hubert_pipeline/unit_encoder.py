"""A unit encoder: audio → one layer of a HuBERT model → nearest k-means centroid, 50 units per second.

The one code path of units from audio: the units stages (`layer_features.stream_units_shard`), the CLI
(`python -m hubert_pipeline.encode`) and the registered MLflow model (`hubert_pipeline.units_pyfunc`) all call
`UnitEncoder.units`, so the same audio, model, layer and centroids give the same units everywhere. The CLI's
`--batch-seconds` forwards files in padded batches through `UnitEncoder.units_batch`, the same code (`units` is
`units_batch` of one file): units equal up to float rounding near a boundary between two centroids.

An encoder is three parts (`EncoderParts`): a checkpoint (any layout `HuBERT.from_pretrained` reads), a layer
(1-based, transformer layer outputs as fairseq's `output_layer`) and a centroids file (`kmeans.save_centroids`),
plus `normalize` (the waveform layer norm the model was trained with). A registered units model
(`models:/<name>-units@itN`, written by the `register_units_itN` stages) holds all three; `open_parts` finds them
in it, or in a checkpoint URI's companion units model (`models:/hubert-pipeline@it1` → `hubert-pipeline-units@it1`).
"""

import contextlib
import hashlib
import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from hubert_pipeline.audio import AudioSource
    from hubert_pipeline.model import HuBERT

UNITS_SUFFIX = "-units"  # the registered units model of `<name>@itN` is `<name>-units@itN`
CONFIG_ARTIFACT = "units_config"  # artifact keys of a registered units model
CHECKPOINT_ARTIFACT = "checkpoint"
CENTROIDS_ARTIFACT = "centroids"
FRAME_RATE = 50.0  # units per second: HuBERT's frames (20 ms)


def load_teacher(source: str, layer: int, device: str) -> "tuple[HuBERT, torch.device]":
    from hubert_pipeline.model import HuBERT

    model = HuBERT.from_pretrained(source)
    if not 1 <= layer <= model.config.encoder_num_layers:
        raise ValueError(f"{source}: layer {layer} is out of range 1..{model.config.encoder_num_layers}")
    from hubert_pipeline.kmeans import resolve_device

    dev = resolve_device(device)
    return model.to(dev).eval(), dev


@torch.no_grad()
def layer_outputs(model: "HuBERT", waveforms: list[torch.Tensor], layer: int, *, normalize: bool) -> list[torch.Tensor]:
    """(frames, D) output of transformer layer `layer` (1-based) for each waveform (T,), in one zero-padded batch.

    Each waveform is normalised over its own samples, and the model masks the padding (`lengths`): a file's output is
    the one it gets alone, up to float rounding (tests/test_encode.py). One waveform is forwarded as it is.
    """
    if normalize:
        waveforms = [torch.nn.functional.layer_norm(w, w.shape) for w in waveforms]
    lengths = torch.tensor([len(w) for w in waveforms])
    batch = torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True)  # (B, longest)
    outputs = model.get_intermediate_outputs(batch, lengths=lengths, num_layers=layer, before_residual=False)
    frames = model.frame_mask(lengths, batch.shape[1]).sum(1).tolist()
    return [x[:n].float() for x, n in zip(outputs[layer - 1], frames, strict=True)]


def layer_output(model: "HuBERT", waveform: torch.Tensor, layer: int, *, normalize: bool) -> torch.Tensor:
    """(frames, D) output of transformer layer `layer` (1-based) for one waveform (T,)."""
    return layer_outputs(model, [waveform], layer, normalize=normalize)[0]


@dataclass(frozen=True)
class EncoderParts:
    checkpoint: str  # a local folder or file
    layer: int
    centroids: str  # a local centroids.safetensors
    normalize: bool = False


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    digest, path = hashlib.sha256(), Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def deduplicate(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal consecutive units: (unit of each run, its length in frames); the lengths sum to len(units)."""
    units = np.asarray(units)
    if len(units) == 0:
        return units.copy(), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    return units[starts], np.diff(np.r_[starts, len(units)])


class UnitEncoder:
    """Units of a waveform: `encoder.units(load_audio(source))` → int64 array, one unit per model frame (50 Hz)."""

    def __init__(self, model: "HuBERT", layer: int, centroids: torch.Tensor, *, normalize: bool) -> None:
        self.model, self.layer, self.normalize = model, layer, normalize
        self.device = next(model.parameters()).device
        self.centroids = centroids.to(self.device)

    @classmethod
    def load(cls, parts: EncoderParts, device: str = "cpu") -> "UnitEncoder":
        from hubert_pipeline.kmeans import load_centroids

        model, _ = load_teacher(parts.checkpoint, parts.layer, device)
        centroids = load_centroids(parts.centroids, dim=model.config.encoder_embed_dim)
        return cls(model, parts.layer, centroids, normalize=parts.normalize)

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu") -> "UnitEncoder":
        """An encoder from a registered units model (`models:/hubert-pipeline-units@it1`) or its local folder."""
        with open_parts(source) as (parts, _):
            return cls.load(parts, device)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def units(self, waveform: torch.Tensor) -> np.ndarray:
        """(samples,) 16 kHz float waveform → (frames,) int64 units."""
        return self.units_batch([waveform])[0]

    def units_batch(self, waveforms: list[torch.Tensor]) -> list[np.ndarray]:
        """The units of each waveform, forwarded together as one zero-padded batch (`layer_outputs`).

        A file's units are those it gets alone except where float rounding moves a frame across the boundary of
        two nearly equidistant centroids (docs/benchmarks.md: measured on the demo corpus).
        """
        from hubert_pipeline.kmeans import predict

        features = layer_outputs(self.model, [w.to(self.device) for w in waveforms], self.layer,
                                 normalize=self.normalize)  # fmt: skip
        units = predict(torch.cat(features), self.centroids).cpu().numpy()
        return np.split(units, np.cumsum([len(f) for f in features[:-1]]))

    def units_of(self, source: "AudioSource | str | Path") -> np.ndarray:
        """Units of an audio file (read as every stage reads it: `audio.load_audio`)."""
        from hubert_pipeline.audio import AudioSource, load_audio

        return self.units(load_audio(source if isinstance(source, AudioSource) else AudioSource(str(source))))


def _read_mlmodel_artifacts(folder: Path) -> dict[str, Path] | None:
    """Artifact key → local path of a downloaded pyfunc model folder; None when `folder` is not one."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifacts = {key: folder / value["path"] for key, value in (flavor.get("artifacts") or {}).items()}
    return artifacts if CONFIG_ARTIFACT in artifacts else None


def parts_of_units_model(folder: Path) -> EncoderParts | None:
    """The parts of a units model folder (MLmodel + artifacts), None when `folder` is not one."""
    artifacts = _read_mlmodel_artifacts(folder)
    if artifacts is None:
        return None
    config = json.loads(artifacts[CONFIG_ARTIFACT].read_text())
    return EncoderParts(str(artifacts[CHECKPOINT_ARTIFACT]), int(config["layer"]), str(artifacts[CENTROIDS_ARTIFACT]),
                        bool(config.get("normalize", False)))  # fmt: skip


def registry_version(uri: str) -> dict[str, str] | None:
    """{"name", "version", "alias"} of a `models:/name@alias` or `models:/name/version` URI; None for others."""
    if not uri.startswith("models:/"):
        return None
    import mlflow

    from hubert_pipeline.tracking import reading_uri

    client = mlflow.MlflowClient(tracking_uri=reading_uri(), registry_uri=reading_uri())
    body = uri.removeprefix("models:/").rstrip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return {"name": name, "alias": alias, "version": str(client.get_model_version_by_alias(name, alias).version)}
    name, version = body.rsplit("/", 1)
    return {"name": name, "alias": "", "version": version}


@contextlib.contextmanager
def open_parts(
    model: str, *, layer: int | None = None, centroids: str | None = None, normalize: bool | None = None
) -> Generator[tuple[EncoderParts, dict[str, Any]]]:
    """The parts of an encoder, and what they are (`provenance`), local for the block's duration.

    `model` is a units model (registry URI or folder: its layer and centroids unless given), or a checkpoint (path,
    HF folder, `models:/name@alias`: the layer and centroids of the registered `name-units@alias` unless given).
    """
    from hubert_pipeline.compat import local_source

    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(local_source(model))
        found = parts_of_units_model(folder) if folder.is_dir() else None
        version = registry_version(model)
        if found is None and (layer is None or centroids is None):
            if version is None or not version["alias"]:
                raise ValueError(
                    f"{model} is a checkpoint, not a units model: give --layer and --centroids (or a registered "
                    "units model, models:/<name>-units@<alias>)"
                )
            companion = f"models:/{version['name']}{UNITS_SUFFIX}@{version['alias']}"
            units_folder = stack.enter_context(local_source(companion))
            found = parts_of_units_model(units_folder)
            if found is None:
                raise ValueError(f"{companion} is not a units model (registered by the register_units_itN stages)")
            found = EncoderParts(str(folder), found.layer, found.centroids, found.normalize)
        base = found or EncoderParts(str(folder), 0, "")
        parts = EncoderParts(base.checkpoint, layer or base.layer, centroids or base.centroids,
                             base.normalize if normalize is None else normalize)  # fmt: skip
        yield parts, provenance(model, parts, version)


def provenance(model: str, parts: EncoderParts, version: dict[str, str] | None) -> dict[str, Any]:
    """What made a set of units: recorded beside every output."""
    from hubert_pipeline.kmeans import load_centroids

    return {
        "model": model,
        "model_version": version,
        "checkpoint_sha256": sha256_of(parts.checkpoint),
        "layer": parts.layer,
        "normalize": parts.normalize,
        "centroids_sha256": sha256_of(parts.centroids),
        "k": int(load_centroids(parts.centroids).shape[0]),
        "frame_rate": FRAME_RATE,
    }
