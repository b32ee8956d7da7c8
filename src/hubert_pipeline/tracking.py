"""MLflow tracking: one run per stage execution, in one experiment, on an absolute sqlite store by default.

The tracking URI is, in order: `MLFLOW_TRACKING_URI`; `mlflow.tracking_uri` in params.yaml; else
`sqlite:///<repo root>/mlruns/mlflow.db`, with the repo root taken from `DVC_ROOT` (set by DVC, also inside the
temporary copies that `dvc exp run --queue/--temp` runs in, so their runs land in the user's store) or git.
Artifacts of the default store go to `<repo root>/mlruns/artifacts`.
"""

import contextlib
import dataclasses
import logging
import os
import subprocess
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from hubert_pipeline.params import MlflowParams

logger = logging.getLogger(__name__)


def repo_root() -> Path:
    if root := os.environ.get("DVC_ROOT"):
        return Path(root).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return Path.cwd().resolve()


def _main_repo_root(root: Path) -> Path:
    """The user's repo when running in a DVC temp/queued experiment copy (its git common dir points back)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        )
        common = Path(out.stdout.strip())
        return common.parent if common.name == ".git" else root
    except (subprocess.CalledProcessError, FileNotFoundError):
        return root


def tracking_uri(params: MlflowParams) -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    if params.tracking_uri:
        return params.tracking_uri
    root = _main_repo_root(repo_root())
    (root / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def git_revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses/dicts to MLflow params: {"kmeans.k": 500, ...}."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    kwargs = {}
    if uri.startswith("sqlite:///") and uri.endswith("/mlruns/mlflow.db"):
        kwargs["artifact_location"] = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(name, **kwargs)
    except Exception:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    mlflow_params: MlflowParams,
    params: dict[str, Any] | None = None,
    iteration: int | None = None,
) -> Generator[Any]:
    """An MLflow run for one execution of a stage, tagged with stage, iteration, git revision and DVC experiment."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(mlflow_params)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, mlflow_params.experiment, uri)
    root = repo_root()
    tags = {
        "stage": stage,
        "git_revision": git_revision(root),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_root": str(root),
    }
    if iteration is not None:
        tags["iteration"] = str(iteration)
    name = f"{stage}-{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else stage
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        logger.info("MLflow run %s (%s) in %s", run.info.run_id, name, uri)
        yield run


def metric_logger(run_id: str, uri: str | None) -> Callable[[dict[str, float], int], None]:
    """A `log_fn(metrics, step)` that logs to an existing run; usable from any process (e.g. DDP rank 0)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    return log


def register_model(run_id: str, artifact_path: str, name: str, alias: str, tags: dict[str, str]) -> str:
    """Register runs:/<run_id>/<artifact_path> (a plain artifact folder) as a new version of `name` under `alias`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:  # already exists
        pass
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
