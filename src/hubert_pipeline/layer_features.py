"""Iteration 2: features of one layer of a pretrained model, and units streamed from audio without a full dump.

Only the files the k-means is fitted on are dumped (`fit_fraction` of the training set, fp16 by default, in a
sharded store at 50 Hz). Units of the whole corpus are then computed file by file: audio → model → layer →
nearest centroid, so the layer features of the corpus (531 GB for LibriSpeech in fp32) never touch the disk.
Layer outputs are the transformer layers' outputs (`before_residual=False`), as fairseq's `output_layer=n`.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from hubert_pipeline.audio import SAMPLE_RATE, load_audio, source_of
from hubert_pipeline.io import write_json
from hubert_pipeline.launch import map_tasks
from hubert_pipeline.manifest import read_manifest
from hubert_pipeline.params import ExecutionParams
from hubert_pipeline.store import StoreMeta, assign_shards, finalize_store, is_shard_complete, write_shard
from hubert_pipeline.unit_encoder import FRAME_RATE, EncoderParts, UnitEncoder, layer_output, load_teacher

__all__ = ["FRAME_RATE", "extract_layer_features", "fit_subset", "layer_output", "load_teacher", "stream_units_shard"]


logger = logging.getLogger(__name__)


def fit_subset(manifest: pl.DataFrame, fraction: float, seed: int) -> pl.DataFrame:
    """The seeded subset of training files the k-means is fitted on (at least one file)."""
    n = max(1, round(fraction * manifest.height))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(manifest.height, size=min(n, manifest.height), replace=False))
    return manifest.sort("fileid")[chosen.tolist()]


def check_dump_fits(subset: pl.DataFrame, root: str | Path, *, dim: int, dtype: str) -> None:
    """Refuse, before any forward pass, a feature dump larger than the free space where it is written."""
    samples = int(subset["num_samples"].sum())
    need = int(samples * FRAME_RATE / SAMPLE_RATE) * dim * np.dtype(dtype).itemsize
    folder = Path(root).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        hours = samples / SAMPLE_RATE / 3600
        raise ValueError(
            f"the layer features of the k-means fitting subset ({subset.height} files, {hours:.1f} h of audio: "
            f"{need / 1e9:.1f} GB at {dim} x {dtype}) do not fit in the {free / 1e9:.1f} GB free under {folder}: "
            "lower kmeans.fit_fraction (the recipe's 0.1, which `python -m hubert_pipeline.presets` sets) or "
            "iteration2.dtype, or free space"
        )


def extract_layer_shard(
    manifest: str, root: str, shard: int, num_shards: int, teacher: str, layer: int,
    fileids: list[str], dtype: str, normalize: bool, device: str,
) -> int:  # fmt: skip
    if is_shard_complete(root, shard):
        return -1
    df = assign_shards(read_manifest(manifest).filter(pl.col("fileid").is_in(fileids)), num_shards)
    rows = df.filter(pl.col("shard") == shard).to_dicts()
    model, dev = load_teacher(teacher, layer, device)
    items = (
        (
            row["fileid"],
            layer_output(model, load_audio(source_of(row)).to(dev), layer, normalize=normalize).cpu().numpy(),
        )
        for row in rows
    )
    return write_shard(root, shard, items, dtype=dtype, dim=model.config.encoder_embed_dim)


def extract_layer_features(
    manifest: str | Path,
    root: str | Path,
    *,
    teacher: str,
    layer: int,
    fit_fraction: float,
    seed: int,
    num_shards: int,
    dtype: str,
    normalize: bool,
    execution: ExecutionParams,
) -> StoreMeta:
    """Dump layer features of the k-means fitting subset into a sharded store."""
    subset = fit_subset(read_manifest(manifest), fit_fraction, seed)
    model, _ = load_teacher(teacher, layer, "cpu")  # fail on a bad checkpoint or layer before starting workers
    check_dump_fits(subset, root, dim=model.config.encoder_embed_dim, dtype=dtype)
    num_shards = min(num_shards, subset.height)
    tasks = [
        {"manifest": str(manifest), "root": str(root), "shard": s, "num_shards": num_shards, "teacher": teacher,
         "layer": layer, "fileids": subset["fileid"].to_list(), "dtype": dtype, "normalize": normalize,
         "device": execution.device}
        for s in range(num_shards)
    ]  # fmt: skip
    map_tasks(extract_layer_shard, tasks, execution=execution, desc=f"layer {layer} features", gpu=True)
    dim = model.config.encoder_embed_dim
    return finalize_store(root, num_shards=num_shards, dim=dim, dtype=dtype, frame_rate=FRAME_RATE)


def stream_units_shard(
    manifest: str, parts: str, shard: int, num_shards: int, teacher: str, layer: int, centroids: str,
    normalize: bool, device: str,
) -> int:  # fmt: skip
    """Units of one shard of the manifest, straight from audio: parts/shard-XXXXX.json (fileid → units)."""
    out = Path(parts) / f"shard-{shard:05d}.json"
    if out.is_file():
        return len(json.loads(out.read_text()))
    rows = assign_shards(read_manifest(manifest), num_shards).filter(pl.col("shard") == shard).to_dicts()
    encoder = UnitEncoder.load(EncoderParts(teacher, layer, centroids, normalize), device)  # the CLI's units
    units = {row["fileid"]: encoder.units(load_audio(source_of(row))).tolist() for row in rows}
    write_json(out, units)
    return len(units)
