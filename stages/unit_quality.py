"""Stage unit_quality: unit quality across iterations on one table, beside ABX.

Rows: the MFCC units (targets of iteration 1, k = kmeans.k_it1), MFCC units at the layers' k (kmeans.k: PNMI grows
with k, so layers are compared with these), the it1 best-layer units (targets of iteration 2), and the units of
the it2 model's best layer (what an iteration 3 would train on: k-means with k = kmeans.k on the same fitting
subset, valid split only). Columns: PNMI, phone purity, cluster purity on the valid split, and ABX (within and
across speakers) of MFCC and of each model's best layer. Written as a DVC metrics file and logged to MLflow:
`<row>_<column>` (`it1_best_layer_pnmi`), and the rows compared at equal k once more as one curve per column,
`units_<column>` (`units_pnmi`, `units_phone_purity`, `units_cluster_purity`, `units_abx_within`,
`units_abx_across`) at step 0 (MFCC at kmeans.k), 1 and 2 (the best layer of the it1 and it2 model), which
MLflow's chart view draws against the iteration. Without phone alignments (data.alignments empty) the table
holds k and ABX only, and the k-means and units made only for PNMI are skipped.
"""

import json
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

EQUAL_K_ROWS = ("mfcc_at_k", "it1_best_layer", "it2_best_layer")  # units_* metrics at steps 0, 1, 2

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("manifests", help="folder with train.csv and valid.csv")
    p.add_argument("mfcc", help="folder with the MFCC train/ and valid/ stores")
    p.add_argument("units_it1", help="metrics/units_it1.json")
    p.add_argument("units_it2", help="metrics/units_it2.json")
    p.add_argument("abx_it1", help="outputs/abx/it1 (scores.json)")
    p.add_argument("abx_it2", help="outputs/abx/it2 (scores.json, best_layer.json)")
    p.add_argument("model_it2", help="the chosen it2 model folder")
    p.add_argument("work", help="folder for the it2 layer features, centroids and units (an output)")
    p.add_argument("metrics", help="JSON table to write")
    p.add_argument("--validate", nargs=2, required=True, metavar=("IT1", "IT2"), help="metrics/validate_it{1,2}.json")
    p.add_argument("--summary", required=True, help="JSON of the figures that decide an experiment (dvc exp show)")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.kmeans import fit_kmeans, save_centroids
    from hubert_pipeline.launch import run_job
    from hubert_pipeline.layer_features import extract_layer_features
    from hubert_pipeline.params import load_params
    from hubert_pipeline.summary import experiment_summary
    from hubert_pipeline.tracking import stage_run
    from hubert_pipeline.unit_metrics import unit_quality
    from hubert_pipeline.units import read_units, stream_units_for_split, units_for_split

    params = load_params(args.params)
    scores = {it: json.loads((Path(d) / "scores.json").read_text()) for it, d in (("it1", args.abx_it1),
                                                                                   ("it2", args.abx_it2))}  # fmt: skip
    layer = int(scores["it2"]["best_layer"])
    work = Path(args.work)
    it2 = params.iteration2
    cfg = params.kmeans

    def fit(store: Path, centroids: Path, fit_fraction: float, metadata: dict[str, str]) -> None:
        fit = {"store": str(store), "k": cfg.k, "fit_fraction": fit_fraction, "seed": cfg.seed,
               "max_iter": cfg.max_iter, "tol": cfg.tol, "n_init": cfg.n_init, "chunk_frames": cfg.chunk_frames,
               "device": params.execution.device}  # fmt: skip
        result = run_job(fit_kmeans, fit, execution=params.execution, desc=f"unit_quality-kmeans-{centroids.stem}",
                         gpu=True)  # fmt: skip
        save_centroids(centroids, result, metadata)

    def it2_model_centroids() -> None:  # the it2 model's best layer: features of the fitting subset, k-means
        extract_layer_features(
            str(Path(args.manifests) / "train.csv"), work / "features", teacher=args.model_it2, layer=layer,
            fit_fraction=params.kmeans.fit_fraction, seed=params.kmeans.seed, num_shards=it2.num_shards,
            dtype=it2.dtype, normalize=params.train_it2.normalize, execution=params.execution,
        )  # fmt: skip
        fit(work / "features", work / "centroids.safetensors", 1.0, {"iteration": "3", "layer": str(layer)})

    def it2_model_units() -> None:  # its units of the valid split
        stream_units_for_split(
            Path(args.manifests) / "valid.csv", work / "valid.jsonl", teacher=args.model_it2, layer=layer,
            centroids=work / "centroids.safetensors", num_shards=it2.num_shards, normalize=params.train_it2.normalize,
            tolerance=params.units.length_tolerance, execution=params.execution,
        )  # fmt: skip

    with stage_run("unit_quality", mlflow_params=params.mlflow, params={"kmeans.k": params.kmeans.k}, iteration=2):
        work.mkdir(parents=True, exist_ok=True)
        mfcc_at_k, it3 = {}, {}
        it2_model_centroids()  # also without alignments: register_units_it2's unit encoder uses them
        if params.data.alignments:  # else no unit metrics: the table holds k and ABX only
            alignments = Path(params.data.alignments) / "valid.jsonl"
            fit(Path(args.mfcc) / "train", work / "mfcc_centroids.safetensors", cfg.fit_fraction, {"source": "mfcc"})
            units_for_split(
                Path(args.manifests) / "valid.csv", Path(args.mfcc) / "valid", work / "mfcc_centroids.safetensors",
                work / "mfcc_valid.jsonl", tolerance=params.units.length_tolerance, execution=params.execution,
            )  # fmt: skip
            mfcc_at_k = unit_quality(read_units(work / "mfcc_valid.jsonl"), alignments)
            it2_model_units()
            it3 = unit_quality(read_units(work / "valid.jsonl"), alignments)
        it1_units = json.loads(Path(args.units_it1).read_text())["valid"]
        it2_units = json.loads(Path(args.units_it2).read_text())["valid"]
        best = {it: int(s["best_layer"]) for it, s in scores.items()}
        rows = {
            "mfcc": {"source": "MFCC", "k": cfg.k_it1, **it1_units, **scores["it1"]["mfcc"]},
            "mfcc_at_k": {"source": "MFCC", "k": cfg.k, **mfcc_at_k, **scores["it1"]["mfcc"]},
            "it1_best_layer": {"source": f"it1 layer {best['it1']}", "k": cfg.k, **it2_units,
                               **scores["it1"][f"layer_{best['it1']}"]},
            "it2_best_layer": {"source": f"it2 layer {best['it2']}", "k": cfg.k, **it3,
                               **scores["it2"][f"layer_{best['it2']}"]},
        }  # fmt: skip
        keep = ("source", "k", "pnmi", "phone_purity", "cluster_purity", "within", "across")
        table = {name: {("abx_" + key if key in ("within", "across") else key): row.get(key) for key in keep}
                 for name, row in rows.items()}  # fmt: skip
        write_json(args.metrics, table)
        for name, row in table.items():
            mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in row.items() if isinstance(v, int | float)})
        for step, name in enumerate(EQUAL_K_ROWS):
            mlflow.log_metrics({f"units_{k}": float(v) for k, v in table[name].items()
                                if k != "k" and isinstance(v, int | float)}, step=step)  # fmt: skip
        mlflow.log_artifact(args.metrics)
        validate = {it: json.loads(Path(path).read_text()) for it, path in enumerate(args.validate, start=1)}
        summary = experiment_summary(table, validate)
        write_json(args.summary, summary)
        mlflow.log_metrics({f"summary_{k}": v for k, v in summary.items()})
