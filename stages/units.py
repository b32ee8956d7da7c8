"""Stages units_it1 / units_it2: units of train and valid from the TRAINING k-means, merged into manifests.

Also measures unit quality (PNMI, phone and cluster purity) against phone alignments when data.alignments is set.
"""

from pathlib import Path

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("manifests", help="folder with train.csv and valid.csv")
    p.add_argument("stores", help="folder with the train/ and valid/ feature stores")
    p.add_argument("centroids", help="centroids.safetensors of the training k-means")
    p.add_argument("output", help="folder for train.jsonl and valid.jsonl (manifests with units)")
    p.add_argument("metrics", help="JSON file for the unit-quality metrics")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run
    from hubert_pipeline.unit_metrics import unit_quality
    from hubert_pipeline.units import read_units, units_for_split

    params = load_params(args.params)
    stage = f"units_it{args.iteration}"
    metrics: dict[str, dict] = {}
    with stage_run(stage, mlflow_params=params.mlflow, params={"units": params.units}, iteration=args.iteration):
        for split in ("train", "valid"):
            output = Path(args.output) / f"{split}.jsonl"
            report = units_for_split(
                Path(args.manifests) / f"{split}.csv",
                Path(args.stores) / split,
                args.centroids,
                output,
                tolerance=params.units.length_tolerance,
                execution=params.execution,
            )
            metrics[split] = {"files": report.num_files, "length_adjusted_files": report.num_adjusted}
            if params.data.alignments:
                alignments = Path(params.data.alignments) / f"{split}.jsonl"
                metrics[split] |= unit_quality(read_units(output), alignments)
        write_json(args.metrics, metrics)
        for split, values in metrics.items():
            mlflow.log_metrics({f"{split}_{k}": float(v) for k, v in values.items()})
        mlflow.log_artifact(args.metrics)
