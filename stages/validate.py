"""Stages validate_it1 / validate_it2: every checkpoint on identical validation batches; the best is exported,
plotted and registered in MLflow's model registry under alias itN."""

import dataclasses
import logging
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("valid", help="validation manifest with units (JSONL)")
    p.add_argument("checkpoints", help="checkpoint folder of the pretraining stage")
    p.add_argument("best", help="folder for the chosen model (config.json + model.safetensors)")
    p.add_argument("metrics", help="JSON metrics file")
    p.add_argument("plot_data", help="CSV of loss and accuracy per step")
    p.add_argument("plot_png", help="PNG of loss and accuracy per step")
    args = p.parse_args()
    setup_logging()

    import mlflow
    import polars as pl
    import torch

    from hubert_pipeline.compat import save_native
    from hubert_pipeline.io import atomic_path, write_json
    from hubert_pipeline.launch import run_job
    from hubert_pipeline.manifest import read_checked_manifest
    from hubert_pipeline.model import HuBERT, HubertConfig
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import register_model, stage_run
    from hubert_pipeline.train import list_checkpoints
    from hubert_pipeline.validate import choose, health_warning, plot_scores, validate_checkpoints

    params = load_params(args.params)
    train_cfg = params.train_it1 if args.iteration == 1 else params.train_it2
    read_checked_manifest(args.valid)  # files moved or changed since the manifest stage: an error now, not later
    checkpoints = list_checkpoints(args.checkpoints)
    if not checkpoints:
        raise SystemExit(f"{args.checkpoints}: no checkpoint (step_*.pt) to validate")
    alias = f"it{args.iteration}"
    with stage_run(
        f"validate_it{args.iteration}", mlflow_params=params.mlflow, params={"validate": params.validate},
        iteration=args.iteration,
    ) as run:  # fmt: skip
        scores = run_job(
            validate_checkpoints,
            {"manifest": args.valid, "checkpoints": checkpoints, "cfg": params.validate, "train_cfg": train_cfg},
            execution=params.execution, desc=f"validate_it{args.iteration}", gpu=True,
        )  # fmt: skip
        best = choose(scores, params.validate.rule)
        if warning := health_warning(scores, train_cfg.max_steps):
            logging.getLogger("validate").warning("%s", warning)
            mlflow.set_tag("not_learning", warning)
        mlflow.log_metrics({"commonest_unit_rate": best.commonest_rate, "not_learning": float(warning is not None)})
        for s in scores:
            mlflow.log_metrics({"valid_loss": s.loss, "valid_accuracy": s.accuracy}, step=s.step)
        table = pl.DataFrame([{"step": s.step, "loss": s.loss, "accuracy": s.accuracy} for s in scores])
        with atomic_path(args.plot_data) as tmp:
            table.write_csv(tmp)
        plot_scores(scores, best, args.plot_png, f"validation, iteration {args.iteration}")
        state = torch.load(best.path, map_location="cpu", weights_only=True)
        model = HuBERT.from_state_dict(state["model"], HubertConfig.from_dict(state["model_config"]))
        del state
        save_native(model, args.best, extra={"step": best.step, "valid_loss": best.loss, "iteration": args.iteration})
        metrics = {
            "best_step": best.step,
            "best_loss": best.loss,
            "best_accuracy": best.accuracy,
            "commonest_unit_rate": best.commonest_rate,
            "learning": warning is None,
            "rule": params.validate.rule,
            "checkpoints": [dataclasses.asdict(s) | {"path": Path(s.path).name} for s in scores],
        }
        write_json(args.metrics, metrics)
        mlflow.log_metrics({"best_step": best.step, "best_valid_loss": best.loss, "best_valid_accuracy": best.accuracy})
        mlflow.log_artifact(args.plot_png)
        mlflow.log_artifact(args.metrics)
        mlflow.log_artifacts(args.best, artifact_path="model")
        version = register_model(
            run.info.run_id, "model", params.validate.registered_model, alias,
            {"step": str(best.step), "valid_loss": f"{best.loss:.6f}", "iteration": str(args.iteration)},
        )  # fmt: skip
        mlflow.set_tag("registered_model", f"models:/{params.validate.registered_model}@{alias} (version {version})")
