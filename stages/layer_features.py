"""Stage features_it2: features of the chosen layer of the teacher, for the k-means fitting subset only."""

import json
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("manifest", help="training manifest (CSV)")
    p.add_argument("teacher", help="model folder or checkpoint")
    p.add_argument("layer_file", help="best_layer.json of the ABX stage (used when iteration2.layer is 0)")
    p.add_argument("output", help="feature store folder")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.layer_features import extract_layer_features
    from hubert_pipeline.manifest import read_checked_manifest
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    read_checked_manifest(args.manifest)  # files moved or changed since the manifest stage: an error now, not later
    it2 = params.iteration2
    layer = it2.layer or int(json.loads(Path(args.layer_file).read_text())["layer"])
    with stage_run("features_it2", mlflow_params=params.mlflow, params={"iteration2": it2}, iteration=2):
        meta = extract_layer_features(
            args.manifest, args.output, teacher=args.teacher, layer=layer, fit_fraction=params.kmeans.fit_fraction,
            seed=params.kmeans.seed, num_shards=it2.num_shards, dtype=it2.dtype,
            normalize=params.train_it1.normalize, execution=params.execution,
        )  # fmt: skip
        disk = sum(f.stat().st_size for f in Path(args.output).iterdir())
        mlflow.log_metrics({"layer": layer, "frames": meta.num_frames, "files": meta.num_files, "disk_bytes": disk})
