"""Stage manifest: probe every audio file of the train and valid corpora, write spidr manifests (CSV).

Cheap checks come first (the corpora exist, hold files of manifest.extension, do not overlap), then every file is
probed; a bad file fails the stage (or is skipped, listed with its reason in skipped.csv) before anything is written.
"""

from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("train", help="training audio: folder, uncompressed .tar or fairseq listing (.tsv)")
    p.add_argument("valid", help="validation audio: folder, uncompressed .tar or fairseq listing (.tsv)")
    p.add_argument("output", help="folder for train.csv, valid.csv and skipped.csv")
    args = p.parse_args()
    setup_logging()

    import mlflow
    import polars as pl

    from hubert_pipeline.manifest import build_manifest, check_splits_apart, discover_all, write_csv, write_manifest
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    out = Path(args.output)
    roots = {"train": args.train, "valid": args.valid}
    found = {split: discover_all(root, params.manifest.extensions) for split, root in roots.items()}
    check_splits_apart(roots, found)
    # Probe both splits before writing anything: a bad file fails the stage with nothing half-written.
    results = {
        split: build_manifest(
            roots[split],
            extension=params.manifest.extensions,
            on_bad_file=params.manifest.on_bad_file,
            verify=params.manifest.verify,
            resample=params.manifest.resample,
            downmix=params.manifest.downmix,
            workers=params.execution.workers,
            items=items,
        )
        for split, items in found.items()
    }
    with stage_run("manifest", mlflow_params=params.mlflow, params={"manifest": params.manifest, "data": params.data}):
        for split, (manifest, _) in results.items():
            write_manifest(manifest, out / f"{split}.csv")
            hours = int(manifest["num_samples"].sum()) / 16_000 / 3600
            mlflow.log_metrics({f"{split}_files": manifest.height, f"{split}_hours": hours})
        skipped = pl.concat([s.with_columns(pl.lit(split).alias("split")) for split, (_, s) in results.items()])
        write_csv(skipped, out / "skipped.csv")
        mlflow.log_metric("skipped_files", skipped.height)
        if skipped.height:
            mlflow.log_artifact(str(out / "skipped.csv"))
