"""Stages units_it1 / units_it2: units of train and valid from the TRAINING k-means, merged into manifests.

Iteration 1 reads the MFCC stores; iteration 2 streams audio through the teacher's layer (no feature dump).
Also measures unit quality (PNMI, phone and cluster purity) against phone alignments when data.alignments is set.
"""

import json
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("manifests", help="folder with train.csv and valid.csv")
    p.add_argument("centroids", help="centroids.safetensors of the training k-means")
    p.add_argument("output", help="folder for train.jsonl and valid.jsonl (manifests with units)")
    p.add_argument("metrics", help="JSON file for the unit-quality metrics")
    p.add_argument("--stores", help="iteration 1: folder with the train/ and valid/ feature stores")
    p.add_argument("--teacher", help="iteration 2: model folder or checkpoint")
    p.add_argument("--layer-file", help="iteration 2: best_layer.json (used when iteration2.layer is 0)")
    args = p.parse_args()
    if args.iteration == 1 and not args.stores:
        p.error("--stores is required for iteration 1")
    if args.iteration == 2 and not (args.teacher and args.layer_file):  # noqa: PLR2004
        p.error("--teacher and --layer-file are required for iteration 2")
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run
    from hubert_pipeline.unit_metrics import unit_quality
    from hubert_pipeline.units import read_units, stream_units_for_split, units_for_split

    params = load_params(args.params)
    stage = f"units_it{args.iteration}"
    if args.iteration == 2:  # noqa: PLR2004  reads audio: files moved or changed since probing are an error now
        from hubert_pipeline.manifest import read_checked_manifest

        for split in ("train", "valid"):
            read_checked_manifest(Path(args.manifests) / f"{split}.csv")
    metrics: dict[str, dict] = {}
    with stage_run(stage, mlflow_params=params.mlflow, params={"units": params.units}, iteration=args.iteration):
        for split in ("train", "valid"):
            output = Path(args.output) / f"{split}.jsonl"
            manifest = Path(args.manifests) / f"{split}.csv"
            if args.iteration == 1:
                report = units_for_split(
                    manifest, Path(args.stores) / split, args.centroids, output,
                    tolerance=params.units.length_tolerance, execution=params.execution,
                )  # fmt: skip
            else:
                layer = params.iteration2.layer or int(json.loads(Path(args.layer_file).read_text())["layer"])
                report = stream_units_for_split(
                    manifest, output, teacher=args.teacher, layer=layer, centroids=args.centroids,
                    num_shards=params.iteration2.num_shards, normalize=params.train_it1.normalize,
                    tolerance=params.units.length_tolerance, execution=params.execution,
                )  # fmt: skip
            metrics[split] = {"files": report.num_files, "length_adjusted_files": report.num_adjusted}
            if params.data.alignments:
                alignments = Path(params.data.alignments) / f"{split}.jsonl"
                metrics[split] |= unit_quality(read_units(output), alignments)
        write_json(args.metrics, metrics)
        for split, values in metrics.items():
            mlflow.log_metrics({f"{split}_{k}": float(v) for k, v in values.items()})
        mlflow.log_artifact(args.metrics)
