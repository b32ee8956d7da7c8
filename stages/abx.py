"""Stages abx_it1 / abx_it2: ABX error of every layer of a model (and of MFCC) on the abx item file; the best
layer by `abx.rule` is written to a JSON that later stages read."""

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("model", help="model folder or checkpoint (or models:/ URI)")
    p.add_argument("items", help="fastabx item file")
    p.add_argument("audio", help="folder with the audio of the item file")
    p.add_argument("output", help="folder for scores.json, best_layer.json and abx.png")
    args = p.parse_args()
    setup_logging()

    import math
    from pathlib import Path

    import mlflow

    from hubert_pipeline.abx import abx_per_layer, choose_layer, plot_abx
    from hubert_pipeline.io import write_json
    from hubert_pipeline.launch import run_job
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    train_cfg = params.train_it1 if args.iteration == 1 else params.train_it2
    out = Path(args.output)
    with stage_run(f"abx_it{args.iteration}", mlflow_params=params.mlflow, params={"abx": params.abx},
                   iteration=args.iteration):  # fmt: skip
        scores = run_job(
            abx_per_layer,
            {"model": args.model, "items": args.items, "audio_root": args.audio, "normalize": train_cfg.normalize,
             "device": params.execution.device, "extensions": params.manifest.extensions,
             "resample": params.manifest.resample, "downmix": params.manifest.downmix},
            execution=params.execution, desc=f"abx_it{args.iteration}", gpu=True,
        )  # fmt: skip
        layer = choose_layer(scores, params.abx.rule)
        nan_free = {name: {k: None if math.isnan(v) else v for k, v in s.items()} for name, s in scores.items()}
        write_json(out / "scores.json", nan_free | {"best_layer": layer})
        write_json(out / "best_layer.json", {"layer": layer, "rule": params.abx.rule, "model": args.model})
        plot_abx(scores, out / "abx.png", f"ABX per layer, iteration {args.iteration} (best: layer {layer})")
        for name, s in scores.items():
            if name.startswith("layer_"):
                step = int(name.removeprefix("layer_"))
                mlflow.log_metrics({f"abx_{k}": v for k, v in s.items() if not math.isnan(v)}, step=step)
        mlflow.log_metrics({f"mfcc_abx_{k}": v for k, v in scores["mfcc"].items() if not math.isnan(v)})
        best_scores = {f"best_layer_abx_{k}": v for k, v in scores[f"layer_{layer}"].items() if not math.isnan(v)}
        mlflow.log_metrics({"best_layer": layer} | best_scores)
        mlflow.log_artifact(str(out / "abx.png"))
        mlflow.log_artifact(str(out / "scores.json"))
