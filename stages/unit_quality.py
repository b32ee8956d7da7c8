"""Stage unit_quality: unit quality across iterations on one table, beside ABX.

Rows: the MFCC units (targets of iteration 1, k = kmeans.k_it1), MFCC units at the layers' k (kmeans.k: PNMI grows
with k, so layers are compared with these), with `unit_quality.untrained` the untrained control (iteration 1's
initial weights, `train.initial_model`, at iteration 1's layer, scored as that layer: what training added), the it1
best-layer units (targets of iteration 2), and the units of
the it2 model's best layer (what an iteration 3 would train on: k-means with k = kmeans.k on the same fitting
subset, valid split only). Columns: PNMI, phone purity, cluster purity on the valid split, and ABX (within and
across speakers) of MFCC and of each model's best layer. Written as a DVC metrics file and logged to MLflow:
`<row>_<column>` (`it1_best_layer_pnmi`), and the rows compared at equal k once more as one curve per column,
`units_<column>` (`units_pnmi`, `units_phone_purity`, `units_cluster_purity`, `units_abx_within`,
`units_abx_across`) at step 0 (MFCC at kmeans.k), 1 and 2 (the best layer of the it1 and it2 model), which
MLflow's chart view draws against the iteration. Each comparison of the goals also as a gain with its spread:
`<row>.pnmi_gain_<other>` (it1 over MFCC at k, it1 over its untrained control, it2 over it1: the difference of
their PNMI, less the bias the delete-one-file jackknife estimates) and `..._low`, `..._high`, its 95 % interval
(`unit_metrics.pnmi_gain`), which the summary prints beside the goals. Without phone alignments (data.alignments
empty) the table holds k and ABX only, and the k-means and units made only for PNMI are skipped.

Layer by layer (work/layers.json, and MLflow metrics `layers_it1_pnmi`, `layers_it2_pnmi`, ... at x = layer): each
model's ABX per layer beside the PNMI and purities of the layer whose units the next iteration used (ABX's
choice; iteration2.layer for iteration 1 where set), and with `unit_quality.every_layer` of
every layer (k-means of each layer as for the chosen one; work/layers/itN_layerL keeps its centroids and units),
the HuBERT paper's PNMI per layer, which says whether the layer ABX chose makes the best units.
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
    p.add_argument("model_it1", help="the it1 model whose layer made the it2 targets (iteration2.teacher)")
    p.add_argument("model_it2", help="the chosen it2 model folder")
    p.add_argument("work", help="folder for the it2 layer features, centroids and units (an output)")
    p.add_argument("metrics", help="JSON table to write")
    p.add_argument("--it1-units", required=True, help="outputs/units/it2: the valid units of iteration 1's layer")
    p.add_argument("--validate", nargs=2, required=True, metavar=("IT1", "IT2"), help="metrics/validate_it{1,2}.json")
    p.add_argument("--summary", required=True, help="JSON of the figures that decide an experiment (dvc exp show)")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.layer_quality import (
        QUALITIES,
        add_jackknife,
        gain_units,
        layer_centroids,
        layer_quality,
        layer_rows,
        layer_valid_units,
        mfcc_quality,
        score,
        untrained_quality,
    )
    from hubert_pipeline.params import load_params
    from hubert_pipeline.summary import COLUMNS, experiment_summary
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    scores = {it: json.loads((Path(d) / "scores.json").read_text()) for it, d in (("it1", args.abx_it1),
                                                                                   ("it2", args.abx_it2))}  # fmt: skip
    best = {it: int(s["best_layer"]) for it, s in scores.items()}
    best["it1"] = params.iteration2.layer or best["it1"]  # the layer units_it2 used: iteration2.layer where set
    work, manifests, cfg = Path(args.work), Path(args.manifests), params.kmeans
    models = {"it1": args.model_it1, "it2": args.model_it2}
    normalize = {"it1": params.train_it1.normalize, "it2": params.train_it2.normalize}
    it2_layer = {"model": args.model_it2, "layer": best["it2"], "normalize": normalize["it2"], "params": params}

    def other_layer(it: str, layer: int) -> dict[str, float]:  # unit_quality.every_layer: every layer's units too
        if not (params.unit_quality.every_layer and params.data.alignments):
            return {}
        return layer_quality(models[it], layer, normalize=normalize[it], manifests=manifests,
                             work=work / "layers" / f"{it}_layer{layer}", params=params)  # fmt: skip

    with stage_run("unit_quality", mlflow_params=params.mlflow, params={"kmeans.k": params.kmeans.k}, iteration=2):
        work.mkdir(parents=True, exist_ok=True)
        mfcc_at_k, it3 = {}, {}
        # the it2 model's best layer: k-means of its features, also without alignments (register_units_it2 uses it)
        layer_centroids(manifests, work / "features", work / "centroids.safetensors", **it2_layer,
                        metadata={"iteration": "3", "layer": str(best["it2"])})  # fmt: skip
        if params.data.alignments:  # else no unit metrics: the table holds k and ABX only
            alignments = Path(params.data.alignments) / "valid.jsonl"
            mfcc_at_k = mfcc_quality(manifests, Path(args.mfcc), work, params)  # MFCC at the layers' k
            layer_valid_units(manifests, work / "valid.jsonl", centroids=work / "centroids.safetensors", **it2_layer)
            it3 = score(work / "valid.jsonl", alignments)
        untrained = None
        if params.unit_quality.untrained:  # the control: iteration 1's initial weights at iteration 1's layer
            untrained = untrained_quality(models["it1"], best["it1"], manifests=manifests, work=work / "untrained",
                                          params=params)  # fmt: skip
        it1_units = json.loads(Path(args.units_it1).read_text())["valid"]
        it2_units = json.loads(Path(args.units_it2).read_text())["valid"]
        rows = {
            "mfcc": {"source": "MFCC", "k": cfg.k_it1, **it1_units, **scores["it1"]["mfcc"]},
            "mfcc_at_k": {"source": "MFCC", "k": cfg.k, **mfcc_at_k, **scores["it1"]["mfcc"]},
        }
        if untrained is not None:
            rows["it1_untrained"] = {"source": f"it1 layer {best['it1']}, untrained", "k": cfg.k, **untrained}
        rows |= {
            "it1_best_layer": {"source": f"it1 layer {best['it1']}", "k": cfg.k, **it2_units,
                               **scores["it1"][f"layer_{best['it1']}"]},
            "it2_best_layer": {"source": f"it2 layer {best['it2']}", "k": cfg.k, **it3,
                               **scores["it2"][f"layer_{best['it2']}"]},
        }  # fmt: skip
        keep = ("source", "k", "pnmi", "phone_purity", "cluster_purity", "within", "across")
        table = {name: {("abx_" + key if key in ("within", "across") else key): row.get(key) for key in keep}
                 for name, row in rows.items()}  # fmt: skip
        if params.data.alignments:  # bias-corrected PNMI, gains between the rows with their spread
            add_jackknife(table, gain_units(work, Path(args.it1_units)), alignments)
        write_json(args.metrics, table)
        chosen_quality = {"it1": it2_units, "it2": it3}
        layers = {it: layer_rows(scores[it], best[it], chosen_quality[it], lambda layer, it=it: other_layer(it, layer))
                  for it in ("it1", "it2")}  # fmt: skip
        write_json(work / "layers.json", {"k": cfg.k, "every_layer": params.unit_quality.every_layer, **layers})
        for name, row in table.items():
            mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in row.items() if isinstance(v, int | float)})
        for step, name in enumerate(EQUAL_K_ROWS):
            mlflow.log_metrics({f"units_{k}": float(v) for k, v in table[name].items()
                                if k in COLUMNS and k != "k" and isinstance(v, int | float)}, step=step)  # fmt: skip
        for it, by_layer in layers.items():  # PNMI per layer: one curve per iteration, x = layer
            for layer, row in by_layer.items():
                mlflow.log_metrics({f"layers_{it}_{q}": row[q] for q in QUALITIES if row[q] is not None},
                                   step=int(layer))  # fmt: skip
        mlflow.log_artifact(args.metrics)
        mlflow.log_artifact(str(work / "layers.json"))
        validate = {it: json.loads(Path(path).read_text()) for it, path in enumerate(args.validate, start=1)}
        summary = experiment_summary(table, validate)
        write_json(args.summary, summary)
        mlflow.log_metrics({f"summary_{k}": v for k, v in summary.items()})
