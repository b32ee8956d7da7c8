"""Units: nearest-centroid labels of every file, merged into the manifest and length-checked.

The output of a units stage is one JSONL manifest per split: the manifest's columns plus `units` (ints at the
model's 50 Hz frame rate). Units are computed shard by shard (local workers or SLURM array tasks) into part files,
then merged in manifest order; the merged file is written atomically and rewritten whole on every run, so a rerun
gives byte-identical output and never appends.

Lengths: the model sees `conv_length(num_samples)` frames. MFCC units (100 Hz) are taken every second frame,
which gives exactly that count; a file whose units differ by more than `length_tolerance` frames is an error naming
the file, smaller differences are truncated (extra units) or padded with the last unit (missing ones).
"""

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import polars as pl

from hubert_pipeline.io import atomic_open, project_root, write_json
from hubert_pipeline.launch import map_tasks
from hubert_pipeline.manifest import read_manifest, relative_sources
from hubert_pipeline.model_config import FAIRSEQ_CONV_LAYERS
from hubert_pipeline.params import ExecutionParams
from hubert_pipeline.store import FeatureStore

logger = logging.getLogger(__name__)

MODEL_FRAME_RATE = 50.0  # HuBERT's conv feature extractor: 20 ms stride
PREDICT_CHUNK = 65536  # frames read from a store and assigned at a time (10 MB of 39-d float32)
CONV_LAYERS = FAIRSEQ_CONV_LAYERS  # the strides and kernels of every preset: 50 Hz frames


class LengthMismatchError(ValueError):
    """Units and audio disagree on length by more than the tolerance; the message names the files."""


@overload
def model_frames(num_samples: int) -> int: ...
@overload
def model_frames(num_samples: np.ndarray) -> np.ndarray: ...
def model_frames(num_samples: int | np.ndarray) -> int | np.ndarray:
    """Frames of HuBERT's conv feature extractor for a waveform of `num_samples` (spidr's conv_length)."""
    length = num_samples
    for _, kernel, stride in CONV_LAYERS:
        length = np.maximum((np.asarray(length) - kernel) // stride + 1, 0)
    return int(length) if np.ndim(length) == 0 else length


def frame_step(store_frame_rate: float) -> int:
    """Take every `step`-th feature frame to reach the model's 50 Hz (2 for 100 Hz MFCC, 1 for model features)."""
    step = store_frame_rate / MODEL_FRAME_RATE
    if step < 1 or abs(step - round(step)) > 1e-6:  # noqa: PLR2004
        raise ValueError(f"features at {store_frame_rate} Hz cannot be brought to the model's {MODEL_FRAME_RATE} Hz")
    return round(step)


def transcribe_shard(store: str, centroids: str, parts: str, shard: int) -> int:
    """Units of every file of one store shard, at the store's frame rate, written to parts/shard-XXXXX.json."""
    from hubert_pipeline.kmeans import load_centroids, predict

    out = Path(parts) / f"shard-{shard:05d}.json"
    if out.is_file():  # complete part from an earlier (interrupted) run
        return len(json.loads(out.read_text()))
    features = FeatureStore(store)
    c = load_centroids(centroids, dim=features.meta.dim)
    rows = features.index.filter(pl.col("shard") == shard).sort("offset")
    # chunk by chunk (Δ computed on read for a store of static MFCC), never the whole shard in memory
    units, done = np.empty(int(rows["length"].sum()), np.int64), 0  # filled in place: no list of parts to join
    for chunk in features.iter_chunks(rows["fileid"].to_list(), chunk_frames=PREDICT_CHUNK):
        units[done : done + len(chunk)] = predict(chunk, c, chunk_frames=PREDICT_CHUNK).numpy()
        done += len(chunk)
    result = {
        fid: units[off : off + n].tolist() for fid, off, n in rows.select("fileid", "offset", "length").iter_rows()
    }
    write_json(out, result)
    return len(result)


@dataclass(frozen=True)
class MergeReport:
    num_files: int
    num_adjusted: int  # files truncated or padded within the tolerance
    max_abs_diff: int


def check_one_to_one(manifest_ids: list[str], other_ids: list[str], manifest_name: str, other_name: str) -> None:
    """ValueError naming both sides and some file ids when a file of the manifest is missing from the other side
    (a feature store or units made from another manifest), or the other side has files the manifest lacks."""
    other = set(other_ids)
    if missing := [fid for fid in manifest_ids if fid not in other]:
        raise ValueError(
            f"{len(missing)} file(s) of {manifest_name} are missing from {other_name}, e.g. {missing[:5]}: "
            "it was made from another manifest; rerun the stages after the manifest stage (dvc repro)"
        )
    if extra := sorted(other - set(manifest_ids)):
        raise ValueError(f"{len(extra)} file(s) of {other_name} are not in {manifest_name}, e.g. {extra[:5]}")


def fit_length(units: np.ndarray, expected: int, tolerance: int, fileid: str) -> tuple[np.ndarray, int]:
    diff = len(units) - expected
    if abs(diff) > tolerance:
        raise LengthMismatchError(f"{fileid}: {len(units)} units for {expected} model frames (tolerance {tolerance})")
    if diff > 0:
        return units[:expected], diff
    if diff < 0:
        return np.concatenate([units, np.full(-diff, units[-1] if len(units) else 0, units.dtype)]), diff
    return units, 0


def read_parts(parts: Path, num_shards: int, *, step: int = 1) -> dict[str, np.ndarray]:
    """fileid -> every `step`-th unit (`compact_units`: 2 bytes a unit, not a list's 8-byte pointers) of every part
    file, only the units the merge keeps (half of them for 100 Hz MFCC units)."""
    from hubert_pipeline.data import compact_units

    units: dict[str, np.ndarray] = {}
    for s in range(num_shards):
        part = json.loads((parts / f"shard-{s:05d}.json").read_text())
        units.update((fid, compact_units(u)[::step].copy()) for fid, u in part.items())
    return units


def _length_differences(
    manifest: pl.DataFrame, units: Mapping[str, Sequence[int] | np.ndarray], *, step: int, tolerance: int
) -> tuple[list[int], list[str]]:
    """Units minus model frames of every file of the manifest (after the step), and the errors beyond tolerance."""
    diffs: list[int] = []
    errors: list[str] = []
    for fid, n in manifest.select("fileid", "num_samples").iter_rows():
        kept, expected = -(-len(units[fid]) // step), model_frames(n)  # units[::step] keeps ceil(len / step)
        diffs.append(kept - expected)
        if abs(kept - expected) > tolerance:
            errors.append(f"{fid}: {kept} units for {expected} model frames (tolerance {tolerance})")
    return diffs, errors


def merge_units(
    manifest: pl.DataFrame,
    units: Mapping[str, Sequence[int] | np.ndarray],
    output: str | Path,
    *,
    step: int,
    tolerance: int,
) -> MergeReport:
    """Join units to the manifest one-to-one (every manifest file must have units), check lengths, write JSONL.

    Every length is checked before anything is written; rows are then fitted and written one at a time (memory:
    the units given, not a second copy of them).
    """
    check_one_to_one(manifest["fileid"].to_list(), list(units), "the manifest", f"the units for {output}")
    diffs, errors = _length_differences(manifest, units, step=step, tolerance=tolerance)
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""  # noqa: PLR2004
        raise LengthMismatchError(
            f"{len(errors)} file(s) with units/audio length mismatch:\n  " + "\n  ".join(errors[:20]) + more
        )
    with atomic_open(output) as f:  # the files of its project named relative to it, as in its manifest
        for row in relative_sources(manifest, project_root(output)).iter_rows(named=True):
            fid, expected = row["fileid"], model_frames(row["num_samples"])
            fitted, _ = fit_length(np.asarray(units[fid], dtype=np.int64)[::step], expected, tolerance, fid)
            f.write(json.dumps({**row, "units": fitted.tolist()}, separators=(",", ":")) + "\n")
    adjusted, max_diff = sum(d != 0 for d in diffs), max(map(abs, diffs), default=0)
    if adjusted:
        logger.info("%d/%d files had their units truncated or padded (max %d frames)", adjusted, len(diffs), max_diff)
    return MergeReport(num_files=len(diffs), num_adjusted=adjusted, max_abs_diff=max_diff)


def units_for_split(
    manifest_path: str | Path,
    store_root: str | Path,
    centroids: str | Path,
    output: str | Path,
    *,
    tolerance: int,
    execution: ExecutionParams,
) -> MergeReport:
    """Transcribe one split shard by shard, then merge into `output` (JSONL manifest with units)."""
    store = FeatureStore(store_root)
    manifest = read_manifest(manifest_path)
    check_one_to_one(manifest["fileid"].to_list(), store.fileids, f"manifest {manifest_path}", f"store {store_root}")
    step = frame_step(store.meta.frame_rate)
    parts = Path(output).parent / f".{Path(output).stem}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"store": str(store_root), "centroids": str(centroids), "parts": str(parts), "shard": s}
        for s in range(store.meta.num_shards)
    ]
    map_tasks(transcribe_shard, tasks, execution=execution, desc=f"units {Path(output).stem}", threads=True)
    units = read_parts(parts, store.meta.num_shards, step=step)  # the step taken here: merge with step 1
    report = merge_units(manifest, units, output, step=1, tolerance=tolerance)
    shutil.rmtree(parts)
    return report


def stream_units_for_split(
    manifest_path: str | Path,
    output: str | Path,
    *,
    teacher: str,
    layer: int,
    centroids: str | Path,
    num_shards: int,
    normalize: bool,
    tolerance: int,
    execution: ExecutionParams,
) -> MergeReport:
    """Units of one split from audio through the teacher's layer (no feature dump), merged into `output`."""
    from hubert_pipeline.layer_features import stream_units_shard
    from hubert_pipeline.unit_encoder import load_teacher

    manifest = read_manifest(manifest_path)
    load_teacher(teacher, layer, "cpu")  # a bad checkpoint or layer fails before the workers start
    num_shards = max(1, min(num_shards, manifest.height))
    parts = Path(output).parent / f".{Path(output).stem}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"manifest": str(manifest_path), "parts": str(parts), "shard": s, "num_shards": num_shards,
         "teacher": teacher, "layer": layer, "centroids": str(centroids), "normalize": normalize,
         "device": execution.device}
        for s in range(num_shards)
    ]  # fmt: skip
    map_tasks(stream_units_shard, tasks, execution=execution, desc=f"units {Path(output).stem}", gpu=True)
    report = merge_units(manifest, read_parts(parts, num_shards), output, step=1, tolerance=tolerance)
    shutil.rmtree(parts)
    return report


def read_units(path: str | Path) -> dict[str, np.ndarray]:
    """fileid -> units (int array) from a merged JSONL manifest."""
    df = pl.read_ndjson(path, schema_overrides={"units": pl.List(pl.Int32)})
    return {fid: np.asarray(u, dtype=np.int64) for fid, u in df.select("fileid", "units").iter_rows()}
