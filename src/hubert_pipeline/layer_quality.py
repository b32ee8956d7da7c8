"""Unit quality of a model's layers at `kmeans.k`, each layer's units made as iteration 2's units are made.

For one layer: its features of the k-means fitting subset of the training manifest (`extract_layer_features`, the
subset, seed and dtype of features_it2), k-means with the params' kmeans settings (kmeans_it2's), the valid split's
units streamed from audio (`stream_units_for_split`), scored against the valid alignments (`unit_quality`).

The unit_quality stage scores the layer ABX chose in iteration 2 this way, and with `unit_quality.every_layer` every
layer of both iterations' models (the HuBERT paper's PNMI per layer, beside ABX per layer: does the layer ABX
chose make the best units?); bench/layer_quality.py scores any checkpoint.
"""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hubert_pipeline.kmeans import fit_kmeans, save_centroids
from hubert_pipeline.launch import run_job
from hubert_pipeline.layer_features import extract_layer_features
from hubert_pipeline.params import Params
from hubert_pipeline.summary import GAINS
from hubert_pipeline.unit_metrics import pnmi_corrected, pnmi_gain, read_alignments, unit_quality
from hubert_pipeline.units import read_units, stream_units_for_split, units_for_split

QUALITIES = ("pnmi", "phone_purity", "cluster_purity")
logger = logging.getLogger(__name__)


def fit_centroids(
    store: Path, centroids: Path, params: Params, *, fit_fraction: float, metadata: dict[str, str]
) -> None:
    """k-means of a feature store with k = kmeans.k and the params' kmeans settings; centroids written atomically."""
    km = params.kmeans
    fit = {"store": str(store), "k": km.k, "fit_fraction": fit_fraction, "seed": km.seed, "max_iter": km.max_iter,
           "tol": km.tol, "n_init": km.n_init, "chunk_frames": km.chunk_frames,
           "device": params.execution.device}  # fmt: skip
    result = run_job(fit_kmeans, fit, execution=params.execution, desc=f"kmeans-{centroids.stem}", gpu=True)
    save_centroids(centroids, result, metadata)


def layer_centroids(
    manifests: Path, store: Path, centroids: Path, *, model: str, layer: int, normalize: bool, params: Params,
    metadata: dict[str, str],
) -> None:  # fmt: skip
    """Features of `layer` on the k-means fitting subset (a store at `store`), and their k-means at `centroids`."""
    extract_layer_features(
        manifests / "train.csv", store, teacher=model, layer=layer, fit_fraction=params.kmeans.fit_fraction,
        seed=params.kmeans.seed, num_shards=params.iteration2.num_shards, dtype=params.iteration2.dtype,
        normalize=normalize, execution=params.execution,
    )  # fmt: skip
    fit_centroids(store, centroids, params, fit_fraction=1.0, metadata=metadata)  # the store is the subset


def layer_valid_units(
    manifests: Path, units: Path, *, model: str, layer: int, normalize: bool, centroids: Path, params: Params
) -> None:
    """Units of the valid split by `layer` and `centroids`, streamed from audio, written to `units` (JSON lines)."""
    stream_units_for_split(
        manifests / "valid.csv", units, teacher=model, layer=layer, centroids=centroids,
        num_shards=params.iteration2.num_shards, normalize=normalize,
        tolerance=params.units.length_tolerance, execution=params.execution,
    )  # fmt: skip


def score(units: Path, alignments: Path) -> dict[str, float]:
    """PNMI, phone purity and cluster purity of a units file against the alignments of its split."""
    return unit_quality(read_units(units), alignments)


def gain_units(work: Path, it1_units: Path) -> dict[str, Path]:
    """The valid units file of each row of the unit-quality table: `work` is the unit_quality stage's folder,
    `it1_units` units_it2's (the units of iteration 1's layer)."""
    return {"mfcc_at_k": work / "mfcc_valid.jsonl", "it1_untrained": work / "untrained" / "units" / "valid.jsonl",
            "it1_best_layer": it1_units / "valid.jsonl", "it2_best_layer": work / "valid.jsonl"}  # fmt: skip


def add_jackknife(table: dict[str, dict[str, Any]], units: dict[str, Path], alignments: Path) -> None:
    """Adds to the unit-quality `table`, by the jackknife over the valid files: each row's bias-corrected PNMI
    (`pnmi_corrected`, `unit_metrics.pnmi_corrected`), and each row's PNMI gain over the row it is compared with
    (summary.GAINS; `unit_metrics.pnmi_gain`): the bias-corrected gain and its 95 % interval,
    `<row>.pnmi_gain_<other>`, `..._low`, `..._high`. `units`: each row's valid units file; rows not in the table
    are skipped."""
    phones = read_alignments(alignments)
    rows = {row: read_units(path) for row, path in units.items() if row in table}
    for row, row_units in rows.items():
        table[row]["pnmi_corrected"] = pnmi_corrected(row_units, phones)["pnmi"]
    for row, other in GAINS:
        if row in rows and other in rows:
            gain = pnmi_gain(rows[row], rows[other], phones)
            name = f"pnmi_gain_{other}"
            table[row] |= {name: gain["gain"], f"{name}_low": gain["low"], f"{name}_high": gain["high"]}


def mfcc_quality(manifests: Path, mfcc: Path, work: Path, params: Params) -> dict[str, float]:
    """PNMI and purities of MFCC units at kmeans.k on the valid split (the MFCC store's train/ and valid/): MFCC at
    the layers' k. work/ keeps the centroids and units (mfcc_centroids.safetensors, mfcc_valid.jsonl)."""
    centroids, units = work / "mfcc_centroids.safetensors", work / "mfcc_valid.jsonl"
    fit_centroids(mfcc / "train", centroids, params, fit_fraction=params.kmeans.fit_fraction,
                  metadata={"source": "mfcc"})  # fmt: skip
    units_for_split(manifests / "valid.csv", mfcc / "valid", centroids, units,
                    tolerance=params.units.length_tolerance, execution=params.execution)  # fmt: skip
    return score(units, Path(params.data.alignments) / "valid.jsonl")


def layer_quality(
    model: str, layer: int, *, normalize: bool, manifests: Path, work: Path, params: Params
) -> dict[str, float]:
    """PNMI and purities of `layer`'s units at kmeans.k on the valid split; work/ keeps its centroids and units.

    The layer features are removed once the k-means is fitted (the units are streamed from audio)."""
    work.mkdir(parents=True, exist_ok=True)
    store, centroids, units = work / "features", work / "centroids.safetensors", work / "valid.jsonl"
    layer_centroids(manifests, store, centroids, model=model, layer=layer, normalize=normalize, params=params,
                    metadata={"model": model, "layer": str(layer)})  # fmt: skip
    shutil.rmtree(store)
    layer_valid_units(manifests, units, model=model, layer=layer, normalize=normalize, centroids=centroids,
                      params=params)  # fmt: skip
    return score(units, Path(params.data.alignments) / "valid.jsonl")


def layer_rows(
    abx: dict[str, Any], chosen: int, chosen_quality: dict[str, Any], score_layer: Callable[[int], dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """One iteration's table, layer by layer: PNMI and purities (the chosen layer's from `chosen_quality`, the others'
    from `score_layer(layer)`, {} for none), ABX within and across speakers (`abx`: abx_itN's scores.json)."""
    layers = sorted(int(name.removeprefix("layer_")) for name in abx if name.startswith("layer_"))
    rows = {}
    for layer in layers:
        quality = chosen_quality if layer == chosen else score_layer(layer)
        rows[str(layer)] = {q: quality.get(q) for q in QUALITIES} | {
            "abx_within": abx[f"layer_{layer}"]["within"],
            "abx_across": abx[f"layer_{layer}"]["across"],
            "chosen": layer == chosen,
        }
    return rows


def save_untrained(folder: Path, params: Params) -> None:
    """Iteration 1's initial weights (`train.initial_model` of train_it1 and model.*), as a model folder."""
    from hubert_pipeline.compat import save_native
    from hubert_pipeline.model import HuBERT, HubertConfig
    from hubert_pipeline.train import initial_model

    config = HubertConfig.preset(params.model.size, **params.model.overrides)
    start = initial_model(params.train_it1, config, params.kmeans.k_it1)
    save_native(HuBERT.from_state_dict(start.state_dict(), config), folder, extra={"step": 0, "iteration": 1})


def untrained_quality(
    teacher: str, layer: int, *, manifests: Path, work: Path, params: Params
) -> dict[str, float] | None:
    """The untrained control: iteration 1's initial weights at `layer`, scored as the trained layer is (PNMI and
    purities at kmeans.k where there are alignments, ABX within and across speakers). What iteration 1's training
    added is its row minus this one; work/model keeps the weights, work/units the centroids and units. None where
    `teacher` (iteration2.teacher) is not of the architecture iteration 1 trains (a Base teacher of the Large
    recipe): no control for a model this pipeline did not start."""
    from hubert_pipeline.abx import abx_per_layer
    from hubert_pipeline.compat import config_of
    from hubert_pipeline.model import HubertConfig

    if config_of(teacher) != HubertConfig.preset(params.model.size, **params.model.overrides):
        logger.info("%s is not of model.* (iteration 1's architecture): no untrained control", teacher)
        return None
    save_untrained(work / "model", params)
    model, normalize = str(work / "model"), params.train_it1.normalize
    quality = {}
    if params.data.alignments:
        quality = layer_quality(model, layer, normalize=normalize, manifests=manifests, work=work / "units",
                                params=params)  # fmt: skip
    abx = {"model": model, "items": params.data.abx_items, "audio_root": params.data.abx_audio,
           "normalize": normalize, "device": params.execution.device, "max_layers": layer, "mfcc": False,
           "extensions": params.manifest.extensions, "resample": params.manifest.resample,
           "downmix": params.manifest.downmix}  # fmt: skip
    scores = run_job(abx_per_layer, abx, execution=params.execution, desc="abx-untrained", gpu=True)
    return quality | scores[f"layer_{layer}"]


def log_mel_quality(manifests: Path, work: Path, params: Params) -> dict[str, float]:
    """PNMI and purities at kmeans.k of the log-mel front end's frames (model.*'s mel_bins, two 10 ms frames stacked
    per 20 ms: the input a log-mel model sees, before any weight), fitted on features_it2's subset; work/ keeps the
    features and centroids."""
    import torch

    from hubert_pipeline.audio import load_audio, source_of
    from hubert_pipeline.kmeans import load_centroids, predict
    from hubert_pipeline.layer_features import fit_subset
    from hubert_pipeline.manifest import read_manifest
    from hubert_pipeline.model import LogMelFrontEnd
    from hubert_pipeline.model_config import HubertConfig
    from hubert_pipeline.store import finalize_store, write_shard

    config = HubertConfig.preset(params.model.size, **params.model.overrides)
    front_end, dim = LogMelFrontEnd(config.mel_bins, config.conv_layers), 2 * config.mel_bins

    def frames(row: dict[str, Any]) -> Any:
        with torch.no_grad():
            return front_end(load_audio(source_of(row))[None])[0].numpy()

    subset = fit_subset(read_manifest(manifests / "train.csv"), params.kmeans.fit_fraction, params.kmeans.seed)
    store, centroids = work / "features", work / "centroids.safetensors"
    write_shard(store, 0, ((row["fileid"], frames(row)) for row in subset.to_dicts()), dtype="float32", dim=dim)
    finalize_store(store, num_shards=1, dim=dim, dtype="float32", frame_rate=50.0)
    fit_centroids(store, centroids, params, fit_fraction=1.0, metadata={"source": "log_mel"})
    table = load_centroids(centroids)
    valid = read_manifest(manifests / "valid.csv").to_dicts()
    units = {row["fileid"]: predict(frames(row), table).numpy() for row in valid}
    return unit_quality(units, Path(params.data.alignments) / "valid.jsonl")
