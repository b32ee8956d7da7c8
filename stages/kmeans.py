"""Stages kmeans_it1 / kmeans_it2: fit k-means on a seeded fraction of the training features."""

import time
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("store", help="training feature store")
    p.add_argument("output", help="folder for centroids.safetensors and metrics.json")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.kmeans import fit_kmeans, save_centroids
    from hubert_pipeline.launch import run_job
    from hubert_pipeline.params import load_params
    from hubert_pipeline.store import FeatureStore
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    cfg = params.kmeans
    k = cfg.k_it1 if args.iteration == 1 else cfg.k
    FeatureStore(args.store)  # a missing or incomplete store fails here, before any job starts
    out = Path(args.output)
    with stage_run(
        f"kmeans_it{args.iteration}", mlflow_params=params.mlflow, params={"kmeans": cfg}, iteration=args.iteration
    ):
        start = time.perf_counter()
        fit = {
            "store": args.store,
            "k": k,
            "fit_fraction": cfg.fit_fraction if args.iteration == 1 else 1.0,  # the it2 store holds the subset only
            "seed": cfg.seed,
            "max_iter": cfg.max_iter,
            "tol": cfg.tol,
            "n_init": cfg.n_init,
            "chunk_frames": cfg.chunk_frames,
            "device": params.execution.device,
        }
        result = run_job(fit_kmeans, fit, execution=params.execution, desc=f"kmeans_it{args.iteration}", gpu=True)
        metrics = {
            "k": k,
            "inertia": result.inertia,
            "n_iter": result.n_iter,
            "fit_frames": result.num_frames,
            "fit_files": result.num_files,
            "seconds": time.perf_counter() - start,
        }
        save_centroids(out / "centroids.safetensors", result, {"iteration": str(args.iteration), "store": args.store})
        write_json(out / "metrics.json", metrics)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / "centroids.safetensors"))
        mlflow.log_artifact(str(out / "metrics.json"))
