"""Unit quality (PNMI, purities) of each layer of a model at a given k, as the pipeline's iteration-2 units are made.

    uv run python bench/layer_quality.py outputs/pretrain/it1/best --k 500 --layers 1 2 3 4
    uv run python bench/layer_quality.py mfcc --k 500          # MFCC at the same k, from outputs/features/mfcc
    uv run python bench/layer_quality.py log_mel --k 500       # the log-mel front end's frames (model.*), no weights

For each layer: features of the k-means fitting subset of the training manifest (`extract_layer_features`), k-means
(`fit_kmeans`, the params' kmeans settings), units of the valid split straight from audio (`stream_units_for_split`),
scored against the valid alignments (`unit_quality`): `hubert_pipeline.layer_quality`, as the unit_quality stage
scores each layer (all of them with `unit_quality.every_layer`), for any checkpoint. Prints one JSON line per layer
and appends it to `--results`.
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from hubert_pipeline import layer_quality as lq
from hubert_pipeline.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or checkpoint, or mfcc, or log_mel (the front end's frames)")
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
    fraction = params.kmeans.fit_fraction if args.fit_fraction is None else args.fit_fraction
    params = dataclasses.replace(params, kmeans=dataclasses.replace(params.kmeans, k=args.k, fit_fraction=fraction))
    with tempfile.TemporaryDirectory(prefix="layer_quality-") as work:
        for layer in [0] if args.model in {"mfcc", "log_mel"} else args.layers:
            if args.model == "mfcc":
                quality = lq.mfcc_quality(args.manifests, args.mfcc, Path(work), params)
            elif args.model == "log_mel":
                quality = lq.log_mel_quality(args.manifests, Path(work), params)
            else:
                quality = lq.layer_quality(args.model, layer, normalize=params.train_it1.normalize,
                                           manifests=args.manifests, work=Path(work) / f"layer{layer}",
                                           params=params)  # fmt: skip
            scores = {q: round(v, 4) for q, v in quality.items()}
            row = {"label": args.label, "model": args.model, "layer": layer, "k": args.k, "fit_fraction": fraction}
            row |= scores
            print(json.dumps(row), flush=True)
            with args.results.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
