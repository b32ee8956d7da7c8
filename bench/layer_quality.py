"""Unit quality (PNMI, purities) of each layer of a model at a given k, as the pipeline's iteration-2 units are made.

    uv run python bench/layer_quality.py outputs/pretrain/it1/best --k 500 --layers 1 2 3 4
    uv run python bench/layer_quality.py mfcc --k 500          # MFCC at the same k, from outputs/features/mfcc

For each layer: features of the k-means fitting subset of the training manifest (`extract_layer_features`), k-means
(`fit_kmeans`, the params' kmeans settings), units of the valid split straight from audio (`stream_units_for_split`),
scored against the valid alignments (`unit_quality`): the production functions of the features_it2, kmeans_it2 and
units_it2 stages, for any checkpoint and every layer, where the pipeline only scores the layer ABX chose. Prints one
JSON line per layer and appends it to `--results`.
"""

import argparse
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

from hubert_pipeline.kmeans import fit_kmeans, save_centroids
from hubert_pipeline.layer_features import extract_layer_features
from hubert_pipeline.params import Params, load_params
from hubert_pipeline.unit_metrics import unit_quality
from hubert_pipeline.units import read_units, stream_units_for_split, units_for_split


def fit(store: Path, k: int, fit_fraction: float, centroids: Path, params: Params) -> None:
    km = params.kmeans
    result = fit_kmeans(store, k=k, fit_fraction=fit_fraction, seed=km.seed, max_iter=km.max_iter, tol=km.tol,
                        n_init=km.n_init, chunk_frames=km.chunk_frames, device="cpu")  # fmt: skip
    save_centroids(centroids, result)


def mfcc_quality(k: int, work: Path, params: Params, args: argparse.Namespace) -> dict:
    """PNMI and purities of MFCC units at k on the valid split (the unit_quality stage's MFCC row at equal k)."""
    fraction = params.kmeans.fit_fraction if args.fit_fraction is None else args.fit_fraction
    fit(args.mfcc / "train", k, fraction, work / "mfcc.safetensors", params)
    units_for_split(args.manifests / "valid.csv", args.mfcc / "valid", work / "mfcc.safetensors",
                    work / "mfcc-valid.jsonl", tolerance=params.units.length_tolerance,
                    execution=params.execution)  # fmt: skip
    quality = unit_quality(read_units(work / "mfcc-valid.jsonl"), Path(params.data.alignments) / "valid.jsonl")
    scores = {q: round(v, 4) for q, v in quality.items()}
    return {"model": "mfcc", "layer": 0, "k": k, "fit_fraction": fraction} | scores


def layer_quality(model: str, layer: int, k: int, work: Path, params: Params, args: argparse.Namespace) -> dict:
    """PNMI and purities of one layer's units at k on the valid split."""
    km = params.kmeans
    fraction = km.fit_fraction if args.fit_fraction is None else args.fit_fraction
    store = work / f"layer{layer}"
    extract_layer_features(
        args.manifests / "train.csv", store, teacher=model, layer=layer, fit_fraction=fraction, seed=km.seed,
        num_shards=params.execution.workers, dtype="float32", normalize=params.train_it1.normalize,
        execution=params.execution,
    )  # fmt: skip
    centroids = work / f"layer{layer}.safetensors"
    fit(store, k, 1.0, centroids, params)  # the store holds the fitting subset only, as features_it2's
    units = work / f"layer{layer}-valid.jsonl"
    stream_units_for_split(
        args.manifests / "valid.csv", units, teacher=model, layer=layer, centroids=centroids,
        num_shards=params.execution.workers, normalize=params.train_it1.normalize,
        tolerance=params.units.length_tolerance, execution=params.execution,
    )  # fmt: skip
    quality = unit_quality(read_units(units), Path(params.data.alignments) / "valid.jsonl")
    shutil.rmtree(store)
    return {"model": model, "layer": layer, "k": k, "fit_fraction": fraction} | {
        q: round(v, 4) for q, v in quality.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or checkpoint, or mfcc")
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--fit-fraction", type=float, help="of the training files (default: kmeans.fit_fraction)")
    parser.add_argument("--mfcc", type=Path, default=Path("outputs/features/mfcc"), help="train/ and valid/ stores")
    parser.add_argument("--label", default="", help="a name for this model in the results")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--manifests", type=Path, default=Path("outputs/manifests"))
    parser.add_argument("--results", type=Path, default=Path("outputs/bench/layer_quality.jsonl"))
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="layer_quality-") as work:
        for layer in [0] if args.model == "mfcc" else args.layers:
            quality = mfcc_quality if args.model == "mfcc" else partial(layer_quality, args.model, layer)
            row = {"label": args.label} | quality(args.k, Path(work), params, args)
            print(json.dumps(row), flush=True)
            with args.results.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
