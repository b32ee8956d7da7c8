"""Stage mfcc: 39-d MFCC (13 + deltas + delta-deltas, 100 Hz) of train and valid into sharded feature stores."""

import time
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("manifests", help="folder with train.csv and valid.csv")
    p.add_argument("output", help="folder for the train/ and valid/ stores")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.features import extract_mfcc
    from hubert_pipeline.manifest import read_checked_manifest
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    manifests = {split: Path(args.manifests) / f"{split}.csv" for split in ("train", "valid")}
    audio = {split: read_checked_manifest(path)["num_samples"].sum() for split, path in manifests.items()}
    with stage_run("mfcc", mlflow_params=params.mlflow, params={"mfcc": params.mfcc, "execution": params.execution}):
        for split, manifest in manifests.items():
            audio_seconds = int(audio[split]) / 16_000
            start = time.perf_counter()
            meta = extract_mfcc(manifest, Path(args.output) / split, params=params.mfcc, execution=params.execution)
            seconds = time.perf_counter() - start
            mlflow.log_metrics(
                {
                    f"{split}_frames": meta.num_frames,
                    f"{split}_files": meta.num_files,
                    f"{split}_seconds": seconds,
                    f"{split}_audio_seconds_per_second": audio_seconds / seconds,
                }
            )
