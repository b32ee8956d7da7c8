"""MLflow tracking: one run per stage execution, in one experiment, on an absolute sqlite store by default.

The tracking URI is, in order: `MLFLOW_TRACKING_URI`; `mlflow.tracking_uri` in params.yaml; else
`sqlite:///<repo root>/mlruns/mlflow.db`, with the repo root taken from `DVC_ROOT` (set by DVC, also inside the
temporary copies that `dvc exp run --queue/--temp` runs in, so their runs land in the user's store) or git.
Artifacts of the default store go to `<repo root>/mlruns/artifacts`. Stages write there (`tracking_uri`); the
library's readers (`models:/` URIs in `HuBERT.from_pretrained` and every `python -m hubert_pipeline.*`, the
curves) resolve the same store with `reading_uri`, which never creates one: outside a checkout, or before the
pipeline made its store, they fail with a message naming MLFLOW_TRACKING_URI.

Each run records what ran (`run_tags`): the baseline commit (`git_revision`: DVC's experiment baseline, else HEAD),
whether the code and config that ran differ from it (`git_dirty`, `git_changes`: queued experiments carry the
workspace's uncommitted changes and their `-S` params), a digest of the library and stage code imported
(`code_digest`), the checkout it was imported from (`code_root`) and the DVC experiment (`dvc_experiment`); and
what it read, by DVC's hashes, its datasets and system metrics (`hubert_pipeline.lineage`).
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import subprocess
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from hubert_pipeline import lineage
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
    """The URI stages log to (the default store is created if need be)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    if params.tracking_uri:
        return params.tracking_uri
    root = _main_repo_root(repo_root())
    (root / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


class TrackingStoreError(RuntimeError):
    """No MLflow store to read from; the message says where it was looked for and how to name one."""


def checkout_root() -> Path | None:
    """The checkout of the pipeline this process runs in (a folder with dvc.yaml and params.yaml): `DVC_ROOT`, else
    the git work tree of the current folder (the user's repo for a DVC experiment's copy); None outside one."""
    if root := os.environ.get("DVC_ROOT"):
        candidate = Path(root).resolve()
    else:
        try:
            out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None
        candidate = Path(out.stdout.strip()).resolve()
    candidate = _main_repo_root(candidate)
    return candidate if (candidate / "dvc.yaml").is_file() and (candidate / "params.yaml").is_file() else None


def reading_uri(params: MlflowParams | None = None) -> str:
    """The URI to read runs and registered models from: `MLFLOW_TRACKING_URI`; else one this process set with
    `mlflow.set_tracking_uri`; else the checkout's (`params`, else its params.yaml's `mlflow.tracking_uri`, else its
    sqlite store, which must exist). TrackingStoreError outside a checkout or without a store: never a new, empty
    database (MLflow's own default is `./mlflow.db`, wherever the process runs)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if is_tracking_uri_set():
        import mlflow

        return mlflow.get_tracking_uri()
    root = checkout_root()
    if root is None:
        raise TrackingStoreError(
            f"{Path.cwd()} is not inside a checkout of the pipeline (a git work tree with dvc.yaml and params.yaml): "
            "set MLFLOW_TRACKING_URI to the tracking store that holds the runs and models "
            "(e.g. sqlite:////path/to/hubert-pipeline/mlruns/mlflow.db), or run from the checkout"
        )
    if params is None:
        params = _checkout_mlflow_params(root)
    if params.tracking_uri:
        return params.tracking_uri
    db = root / "mlruns" / "mlflow.db"
    if not db.is_file():
        raise TrackingStoreError(
            f"no MLflow store at {db}: run the pipeline first (e.g. `dvc repro validate_it1` registers "
            "models:/hubert-pipeline@it1), or set MLFLOW_TRACKING_URI to the store that holds the runs and models"
        )
    return f"sqlite:///{db}"


def checkout_uri(root: Path) -> str:
    """The store of the checkout at `root` as its stages resolve it, nothing created: `MLFLOW_TRACKING_URI`, else
    `mlflow.tracking_uri` of its params.yaml, else `sqlite:///<root>/mlruns/mlflow.db` (absolute)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    params = _checkout_mlflow_params(root) if (root / "params.yaml").is_file() else MlflowParams()
    return params.tracking_uri or f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def _checkout_mlflow_params(root: Path) -> MlflowParams:
    import yaml

    from hubert_pipeline.params import build

    path = root / "params.yaml"
    with path.open(encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    return build(MlflowParams, raw.get("mlflow"), f"{path}:mlflow")


def git_revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


CODE_FOLDERS = ("src/hubert_pipeline", "stages")  # the code a stage runs, hashed into `code_digest`
TREE_PATHS = ("src", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", "uv.lock")  # what `git_dirty` compares


def code_root() -> Path:
    """The checkout this process imported the library from (`<root>/src/hubert_pipeline`)."""
    return Path(__file__).resolve().parents[2]


def code_digest(root: Path) -> str:
    """sha256 (16 hex digits) of the library and stage sources of a checkout: names and contents, sorted."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(root: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root, input=stdin).stdout


def tree_changes(root: Path) -> list[str] | None:
    """Code and config paths of a checkout whose content differs from its HEAD (new untracked ones too); None
    without git. Contents are hashed, not compared by git's stat cache: DVC writes the experiment copies' files
    and index within the same second, where `git status` can miss a same-size edit (`-S kmeans.k=4` to 5)."""
    try:
        listing = _git(root, "ls-tree", "-r", "HEAD", "--", *TREE_PATHS).splitlines()  # "<mode> blob <sha>\t<path>"
        head = {path: meta.split()[2] for meta, path in (line.split("\t", 1) for line in listing)}
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *TREE_PATHS).split()
        present = [path for path in head if (root / path).is_file()]
        hashes = _git(root, "hash-object", "--stdin-paths", stdin="\n".join(present)).split()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    changed = {path for path, sha in zip(present, hashes, strict=True) if head[path] != sha}
    return sorted(changed | (head.keys() - set(present)) | set(untracked))


def run_tags(stage: str, iteration: int | None = None) -> dict[str, str]:
    """What ran: the stage, the baseline commit, whether the tree differed from it, the code digest, the experiment."""
    root = code_root()
    changes = tree_changes(root)
    tags = {
        "stage": stage,
        "git_revision": os.environ.get("DVC_EXP_BASELINE_REV") or git_revision(root),
        "git_dirty": "unknown" if changes is None else str(bool(changes)).lower(),
        "git_changes": ", ".join(changes or [])[:5000],
        "code_digest": code_digest(root),
        "code_root": str(root),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_root": str(repo_root()),
    }
    if iteration is not None:
        tags["iteration"] = str(iteration)
    return tags


def run_name(stage: str) -> str:
    """`<experiment>/<stage>` inside a DVC experiment (runs of one experiment sort together), else the stage."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{experiment}/{stage}" if experiment else stage


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
def _store_lock(uri: str) -> Generator[None]:
    """Exclusive use of a sqlite store while a process first opens it: parallel experiments (`dvc queue start -j N`)
    creating a new store at once raced on its tables ("table experiments already exists")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    mlflow_params: MlflowParams,
    params: dict[str, Any] | None = None,
    iteration: int | None = None,
) -> Generator[Any]:
    """An MLflow run for one execution of a stage, named after the DVC experiment and tagged with what ran."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(mlflow_params)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        experiment_id = _experiment_id(mlflow, mlflow_params.experiment, uri)
    root = lineage.checkout()
    tags = run_tags(stage, iteration) | lineage.lineage_tags(root, stage, experiment_id, uri)
    name = run_name(stage)
    system_metrics = True if lineage.system_metrics(stage) else None  # None: MLflow's own switch decides
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=name, tags=tags, log_system_metrics=system_metrics
    ) as run:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        lineage.log_manifests(root, stage)
        logger.info("MLflow run %s (%s) in %s", run.info.run_id, name, uri)
        yield run
        lineage.tag_outputs(root, stage)


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
    tags = lineage.version_tags(lineage.checkout(), run_id, int(tags["step"]) if "step" in tags else None) | tags
    try:
        client.create_registered_model(name)
    except MlflowException:  # already exists
        pass
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
