"""Stages pretrain_it1 / pretrain_it2: HuBERT pretraining on the units, resumed from the last checkpoint if any.

With train_itN.processes > 1, that many local processes train with DDP (gloo on CPU, NCCL on GPU).
"""

from pathlib import Path

from hubert_pipeline.cli import parser, setup_logging


def worker(rank: int, world_size: int, port: int, kwargs: dict, run_id: str, uri: str) -> None:
    import os

    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.tracking import metric_logger
    from hubert_pipeline.train import train

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    setup_logging()
    train(**kwargs, log_fn=metric_logger(run_id, uri) if rank == 0 else None)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("units", help="folder with train.jsonl (manifest with units)")
    p.add_argument("centroids", help="centroids.safetensors of the k-means that made the units (gives k)")
    p.add_argument("output", help="checkpoint folder (kept across runs: an interrupted run resumes)")
    args = p.parse_args()
    setup_logging()

    import socket

    import mlflow
    import torch.multiprocessing as mp

    from hubert_pipeline.kmeans import load_centroids
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run, tracking_uri
    from hubert_pipeline.train import list_checkpoints, train

    params = load_params(args.params)
    cfg = params.train_it1 if args.iteration == 1 else params.train_it2
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
        uri = tracking_uri(params.mlflow)
        if cfg.processes > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(worker, args=(cfg.processes, port, kwargs, run.info.run_id, uri), nprocs=cfg.processes)
        else:
            from hubert_pipeline.tracking import metric_logger

            train(**kwargs, log_fn=metric_logger(run.info.run_id, uri))
        mlflow.log_metric("checkpoints", len(list_checkpoints(args.output)))
