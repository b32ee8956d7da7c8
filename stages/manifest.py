"""Stage manifest: probe every audio file of the train and valid corpora, write spidr manifests (CSV)."""

from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("train", help="training audio: folder or uncompressed .tar")
    p.add_argument("valid", help="validation audio: folder or uncompressed .tar")
    p.add_argument("output", help="folder for train.csv, valid.csv and skipped.csv")
    args = p.parse_args()
    setup_logging()

    import mlflow
    import polars as pl

    from hubert_pipeline.audio import build_manifest, write_csv
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    out = Path(args.output)
    # Probe both splits before writing anything: a bad file fails the stage with nothing half-written.
    results = {
        split: build_manifest(
            root,
            extension=params.manifest.extension,
            on_bad_file=params.manifest.on_bad_file,
            workers=params.execution.workers,
        )
        for split, root in (("train", args.train), ("valid", args.valid))
    }
    if overlap := set(results["train"][0]["fileid"]) & set(results["valid"][0]["fileid"]):
        msg = f"{len(overlap)} file id(s) are in both train and valid, e.g. {sorted(overlap)[:5]}"
        raise SystemExit(msg)
    with stage_run("manifest", mlflow_params=params.mlflow, params={"manifest": params.manifest, "data": params.data}):
        for split, (manifest, _) in results.items():
            write_csv(manifest, out / f"{split}.csv")
            hours = int(manifest["num_samples"].sum()) / 16_000 / 3600
            mlflow.log_metrics({f"{split}_files": manifest.height, f"{split}_hours": hours})
        skipped = pl.concat([s.with_columns(pl.lit(split).alias("split")) for split, (_, s) in results.items()])
        write_csv(skipped, out / "skipped.csv")
        mlflow.log_metric("skipped_files", skipped.height)
        if skipped.height:
            mlflow.log_artifact(str(out / "skipped.csv"))
