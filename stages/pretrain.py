"""Stages pretrain_it1 / pretrain_it2: HuBERT pretraining on the units, resumed from the last checkpoint if any.

With train_itN.processes > 1, that many local processes train with DDP (gloo on CPU, NCCL on GPU). With
`execution.executor: slurm`, one SLURM job of nodes x tasks trains instead, requeued on preemption or time-out.
"""

import logging
import tempfile
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("units", help="folder with train.jsonl (manifest with units)")
    p.add_argument("centroids", help="centroids.safetensors of the k-means that made the units (gives k)")
    p.add_argument("output", help="checkpoint folder (kept across runs: an interrupted run resumes)")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.kmeans import load_centroids
    from hubert_pipeline.launch import run_distributed, training_processes
    from hubert_pipeline.manifest import read_checked_manifest, short_files, write_csv
    from hubert_pipeline.params import load_params
    from hubert_pipeline.presets import batch_shortfall
    from hubert_pipeline.tracking import stage_run, tracking_uri
    from hubert_pipeline.train import list_checkpoints, train_process

    params = load_params(args.params)
    cfg = params.train_it1 if args.iteration == 1 else params.train_it2
    short = short_files(read_checked_manifest(Path(args.units) / "train.jsonl"), cfg.min_sample_size)
    num_classes = load_centroids(args.centroids).shape[0]
    resumed = list_checkpoints(args.output)
    kwargs = {
        "manifest": str(Path(args.units) / "train.jsonl"),
        "out_dir": args.output,
        "cfg": cfg,
        "model_size": params.model.size,
        "model_overrides": params.model.overrides,
        "num_classes": num_classes,
    }
    with stage_run(
        f"pretrain_it{args.iteration}",
        mlflow_params=params.mlflow,
        params={"train": cfg, "model": params.model, "num_classes": num_classes},
        iteration=args.iteration,
    ) as run:
        if resumed:
            mlflow.set_tag("resumed_from_step", str(resumed[-1][0]))
        mlflow.log_metric("short_files", short.height)  # listed in the run's artifact short_files.csv
        if short.height:
            logging.getLogger("pretrain").warning(
                "%d training file(s) are shorter than min_sample_size (%d samples) and never train: "
                "listed in the MLflow run's short_files.csv", short.height, cfg.min_sample_size,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                write_csv(short, Path(tmp) / "short_files.csv")
                mlflow.log_artifact(str(Path(tmp) / "short_files.csv"))
        world = training_processes(params.execution, cfg.processes)
        seconds = world * cfg.accumulate * cfg.max_batch_samples / 16_000  # at most: batches are filled by length
        mlflow.log_metric("audio_seconds_per_update_max", seconds)
        if warning := batch_shortfall(params.model.recipe, seconds):
            logging.getLogger("pretrain").warning("%s", warning)
            mlflow.set_tag("batch_below_recipe", warning)
        kwargs |= {"run_id": run.info.run_id, "tracking_uri": tracking_uri(params.mlflow)}
        run_distributed(train_process, kwargs, execution=params.execution, desc=f"pretrain_it{args.iteration}",
                        processes=cfg.processes)  # fmt: skip
        mlflow.log_metric("checkpoints", len(list_checkpoints(args.output)))
