"""Loss and masked accuracy per step of several runs (e.g. seeds) as one band: the reference curves of a healthy run.

    python -m hubert_pipeline.curves docs/demo_curves --runs seed0= seed1=demo-seed1 seed2=demo-seed2

Each `--runs` entry is LABEL=DVC_EXPERIMENT (empty: the workspace's runs) in the project's MLflow store; the latest
pretrain_itN / validate_itN run of each is read. Writes OUT.csv (every run's figures per step) and OUT.png (per
iteration: training loss and accuracy per step, validation per checkpoint, the band from lowest to highest).
"""

import argparse
from pathlib import Path
from typing import Any

import polars as pl

METRICS = {"pretrain": ("train_loss", "train_accuracy"), "validate": ("valid_loss", "valid_accuracy")}


def _latest_run(client: Any, experiment_id: str, stage: str, dvc_experiment: str) -> Any:
    runs = client.search_runs(
        [experiment_id],
        f"tags.stage = '{stage}' and tags.dvc_experiment = '{dvc_experiment}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"no finished {stage} run with dvc_experiment '{dvc_experiment}' in the MLflow store")
    return runs[0]


def collect(tracking_uri: str, experiment: str, runs: dict[str, str]) -> pl.DataFrame:
    """One row per (label, iteration, kind, step) with loss and accuracy."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    rows = []
    for label, dvc_experiment in runs.items():
        for it in (1, 2):
            for kind, (loss_key, acc_key) in METRICS.items():
                run = _latest_run(client, found.experiment_id, f"{kind}_it{it}", dvc_experiment)
                losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, loss_key)}
                accuracies = {m.step: m.value for m in client.get_metric_history(run.info.run_id, acc_key)}
                rows += [{"run": label, "iteration": it, "kind": kind, "step": step, "loss": loss,
                          "accuracy": accuracies.get(step)} for step, loss in sorted(losses.items())]  # fmt: skip
    return pl.DataFrame(rows)


def band(table: pl.DataFrame) -> pl.DataFrame:
    """Lowest, mean and highest loss and accuracy over the runs, per (iteration, kind, step)."""
    return (
        table.group_by("iteration", "kind", "step")
        .agg(
            pl.len().alias("runs"),
            *(getattr(pl.col(c), f)().alias(f"{c}_{f}") for c in ("loss", "accuracy") for f in ("min", "mean", "max")),
        )
        .sort("iteration", "kind", "step")
    )


def plot(bands: pl.DataFrame, path: Path, title: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from hubert_pipeline.io import atomic_path

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=100, sharex="col")
    for col, it in enumerate((1, 2)):
        for row, metric in enumerate(("loss", "accuracy")):
            ax = axes[row][col]
            for kind, style in (("pretrain", "-"), ("validate", "o--")):
                b = bands.filter((pl.col("iteration") == it) & (pl.col("kind") == kind))
                steps = b["step"].to_list()
                ax.fill_between(steps, b[f"{metric}_min"].to_list(), b[f"{metric}_max"].to_list(), alpha=0.25)
                ax.plot(steps, b[f"{metric}_mean"].to_list(), style, label=f"{kind.replace('pretrain', 'train')} mean")
            ax.set_title(f"iteration {it}: masked {metric}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("step")
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("out", type=Path, help="output path without extension (writes .csv and .png)")
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=DVC_EXPERIMENT (empty: the workspace's)")
    parser.add_argument("--params", default="params.yaml", help="params file (MLflow store and experiment)")
    args = parser.parse_args()
    from hubert_pipeline.io import atomic_path
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import reading_uri

    if bad := [r for r in args.runs if "=" not in r]:
        parser.error(f"--runs entries are LABEL=DVC_EXPERIMENT, not {bad}")
    runs = dict(r.split("=", 1) for r in args.runs)
    mlflow_params = load_params(args.params).mlflow
    table = collect(reading_uri(mlflow_params), mlflow_params.experiment, runs)
    with atomic_path(args.out.with_suffix(".csv")) as tmp:
        table.write_csv(tmp)
    plot(band(table), args.out.with_suffix(".png"), f"{len(runs)} runs: lowest to highest, and mean")
    print(band(table).filter(pl.col("kind") == "validate"))


if __name__ == "__main__":
    main()
