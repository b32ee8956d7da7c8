"""Lineage in MLflow: what each stage run read, by DVC's own hashes, and where each registered model came from.

A stage runs under `dvc repro`, which writes its own entry of dvc.lock only after it ends; the outputs of the stages
before it are already recorded there. So a run is tagged, cheaply (dvc.lock and DVC's `.dir` listings are read,
nothing large is hashed), with:

- `dvc_stage`, `dvc_checkout` (the checkout it ran in: a queued experiment's copy), and `dvc_dep/<path>` = DVC's
  hash of each of its dependencies that another stage made (an output of that stage, a file or folder inside one:
  the value DVC records for the dependency in dvc.lock);
- `upstream/<stage>` = the run id of the latest finished run of each stage it reads from, found by those hashes
  (and in the same checkout when there is one), so a chain of runs can be walked back from the UI;
- `dvc_out/<path>` = the md5 of each small file the stage outputs (k-means centroids, best_layer.json), at its end.

The train and valid manifests a run reads are logged as MLflow datasets (`mlflow.log_input`) named `train` and
`valid`, whose digest is DVC's hash of the file (else its md5, what DVC would record). A registered model version
gets `train_run_id`, `units_run_id`, `kmeans_run_id`, `checkpoint` and `units` (DVC's hash of the units folder).
"""

import hashlib
import json
import logging
import posixpath
import re
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INTEGER_HINT = "Hint: Inferred schema contains integer column"
MANIFEST_NAMES = ("train.csv", "valid.csv", "train.jsonl", "valid.jsonl")  # what a dataset input is
CONTEXTS = {"train": "training", "valid": "validation"}
SMALL_FILE = 64 << 20  # outputs up to this size get a `dvc_out/` md5 tag at the end of their run
MAX_HASHED = 1 << 30  # a manifest not found in dvc.lock is hashed up to this size (a units JSONL of 960 h: 0.7 GB)
SYSTEM_METRICS_STAGES = ("mfcc", "features_it", "kmeans_it", "units_it", "pretrain_it", "validate_it")


def checkout(start: Path | None = None) -> Path:
    """The checkout a stage runs in: the nearest folder from the current one up that holds a dvc.yaml (in a queued
    experiment, its copy under .dvc/tmp/exps: DVC_ROOT names the user's workspace there), else the current one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with path.open(encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _interpolate(text: str, params: dict[str, Any]) -> str:
    """DVC's `${a.b}` in a dvc.yaml entry, from params.yaml."""

    def value(match: re.Match[str]) -> str:
        node: Any = params
        for key in match.group(1).strip().split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _norm(path: str) -> str:
    return posixpath.normpath(path.rstrip("/"))


def _entry_paths(entries: list[Any], params: dict[str, Any]) -> list[str]:
    """The paths of a dvc.yaml `deps`/`outs` list (an entry is a path or a {path: options} mapping)."""
    names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    return [_norm(_interpolate(str(name), params)) for name in names]


def stage_deps(root: Path, stage: str) -> list[str]:
    """The dependencies of `stage` as dvc.yaml lists them, `${...}` resolved; [] when dvc.yaml has no such stage."""
    spec = _yaml(root / "dvc.yaml").get("stages", {}).get(stage, {})
    try:
        return _entry_paths(spec.get("deps", []), _yaml(root / "params.yaml"))
    except (KeyError, TypeError):
        return []


def stage_outs(root: Path, stage: str) -> list[str]:
    spec = _yaml(root / "dvc.yaml").get("stages", {}).get(stage, {})
    try:
        return _entry_paths(spec.get("outs", []), _yaml(root / "params.yaml"))
    except (KeyError, TypeError):
        return []


class Lock:
    """dvc.lock of a checkout: the hash of every output of the stages that ran, by path, and the stage making it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stages: dict[str, Any] = _yaml(root / "dvc.lock").get("stages", {})
        self.outs: dict[str, tuple[str, str]] = {}
        for name, entry in self.stages.items():
            for out in entry.get("outs", []):
                if "md5" in out:
                    self.outs[_norm(out["path"])] = (out["md5"], name)

    def deps(self, stage: str) -> dict[str, str]:
        return {_norm(d["path"]): d["md5"] for d in self.stages.get(stage, {}).get("deps", []) if "md5" in d}

    def producer(self, path: str) -> tuple[str, str, str] | None:
        """(output path, its hash, its stage) of the recorded output that is `path` or holds it."""
        path = _norm(path)
        for out, (md5, stage) in self.outs.items():
            if path == out or path.startswith(out + "/"):
                return out, md5, stage
        return None

    def hash(self, path: str) -> str | None:
        """DVC's hash of `path` as it records a dependency: an output's own hash, or, inside a folder output, the
        file's md5 or the sub-folder's `.dir` hash, from the folder's listing in the cache."""
        found = self.producer(path)
        if found is None:
            return None
        out, md5, _ = found
        if out == _norm(path):
            return md5
        entries = self._listing(md5)
        if entries is None:
            return None
        rel = _norm(path)[len(out) + 1 :]
        for entry in entries:
            if entry["relpath"] == rel:
                return entry["md5"]
        inside = [{"md5": e["md5"], "relpath": e["relpath"][len(rel) + 1 :]} for e in entries
                  if e["relpath"].startswith(rel + "/")]  # fmt: skip
        if not inside:
            return None
        listing = json.dumps(sorted(inside, key=lambda e: e["relpath"]), sort_keys=True)  # as dvc_data's Tree.digest
        return hashlib.md5(listing.encode(), usedforsecurity=False).hexdigest() + ".dir"

    def _listing(self, md5: str) -> list[dict[str, str]] | None:
        if not md5.endswith(".dir"):
            return None
        path = cache_dir(self.root) / "files" / "md5" / md5[:2] / md5[2:]
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def cache_dir(root: Path) -> Path:
    """DVC's cache of a checkout: `cache.dir` of .dvc/config.local or .dvc/config (relative to .dvc/), else
    .dvc/cache. A queued experiment's copy names the user's cache in its config.local."""
    for name in ("config.local", "config"):
        try:
            text = (root / ".dvc" / name).read_text()
        except OSError:
            continue
        section = re.search(r"^\[\s*cache\s*\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.MULTILINE | re.DOTALL)
        if section and (match := re.search(r"^\s*dir\s*=\s*(.+?)\s*$", section.group(1), flags=re.MULTILINE)):
            return (root / ".dvc" / match.group(1).strip("\"'")).resolve()
    return root / ".dvc" / "cache"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def upstream_run(client: Any, experiment_id: str, root: Path, stage: str, lock: Lock) -> str | None:
    """The latest finished run of `stage` whose recorded inputs (and small outputs) are those dvc.lock has for it:
    in this checkout if there is one (the parallel experiments of a sweep read the same inputs), else anywhere."""
    wanted = {f"dvc_dep/{path}": md5 for path, md5 in lock.deps(stage).items() if lock.producer(path)}
    for out in stage_outs(root, stage):
        if out in lock.outs and not lock.outs[out][0].endswith(".dir"):
            wanted[f"dvc_out/{out}"] = lock.outs[out][0]
    base = [f"tags.stage = {_quote(stage)}", "attributes.status = 'FINISHED'"]
    base += [f"tags.`{key}` = {_quote(value)}" for key, value in wanted.items()]
    for scope in ([f"tags.dvc_checkout = {_quote(str(root))}"], []):
        runs = client.search_runs(
            [experiment_id], " and ".join(base + scope), max_results=1, order_by=["attributes.start_time DESC"]
        )
        if runs:
            return runs[0].info.run_id
    return None


def lineage_tags(root: Path, stage: str, experiment_id: str, uri: str) -> dict[str, str]:
    """`dvc_stage`, `dvc_dep/<path>` and `upstream/<stage>` tags of a run of `stage` (see the module docstring)."""
    from mlflow import MlflowClient

    lock = Lock(root)
    tags = {"dvc_stage": stage, "dvc_checkout": str(root)}
    upstream = set()
    for dep in stage_deps(root, stage):
        if (md5 := lock.hash(dep)) is not None and (found := lock.producer(dep)):
            tags[f"dvc_dep/{dep}"] = md5
            upstream.add(found[2])
    client = MlflowClient(tracking_uri=uri)
    for name in sorted(upstream):
        if run_id := upstream_run(client, experiment_id, root, name, lock):
            tags[f"upstream/{name}"] = run_id
    return tags


def file_md5(path: Path) -> str:
    """md5 of a file's bytes: what DVC 3 records for a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def manifests(root: Path, stage: str) -> list[Path]:
    """The train/valid manifests among the dependencies of `stage`: files so named (a units manifest, train.jsonl,
    is named by its stage), or train.csv / valid.csv in a folder (a folder's JSONL files are alignments)."""
    found = []
    for dep in stage_deps(root, stage):
        path = root / dep
        if path.name in MANIFEST_NAMES:
            found.append(path)
        elif path.is_dir():
            found += [path / name for name in MANIFEST_NAMES if name.endswith(".csv")]
    return [p for p in found if p.is_file()]


def manifest_dataset(root: Path, path: Path, lock: Lock) -> Any:
    """An MLflow dataset of a manifest: named train/valid, digest DVC's hash. A CSV is read (schema and row count
    in the UI); a units JSONL (large: units of every frame) is described, not read."""
    import pandas as pd
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.pandas_dataset import from_pandas

    digest = lock.hash(_rel(root, path))
    if digest is None and path.stat().st_size <= MAX_HASHED:
        digest = file_md5(path)
    name, source = path.name.split(".")[0], dataset_source(path)
    if path.suffix == ".csv":
        return from_pandas(pd.read_csv(path), source=source, name=name, digest=digest)
    return MetaDataset(source, name=name, digest=digest)  # ty: ignore[abstract-class-instantiation]  ty misreads it


def dataset_source(path: Path) -> Any:
    """The MLflow dataset source of a local file. MLflow registers its local source twice (schemes "" and "file",
    one class each) and warns that a path matches both whenever it resolves one: resolved against the first alone."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    local = [s for s in get_registered_sources() if getattr(s, "__name__", "") == "LocalArtifactDatasetSource"][:1]
    return resolve_dataset_source(str(path.resolve()), candidate_sources=local or None)


def log_manifests(root: Path, stage: str) -> None:
    """Log the manifests `stage` reads as inputs of the active run (context training / validation)."""
    import mlflow

    lock = Lock(root)
    for path in manifests(root, stage):
        # MLflow's hint that integer columns cannot hold missing values (meant for models' input schemas; a manifest's
        # sample counts never miss) would be shown once per manifest and stage
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=INTEGER_HINT, category=UserWarning)
            dataset = manifest_dataset(root, path, lock)
            mlflow.log_input(dataset, context=CONTEXTS.get(dataset.name), tags={"path": _rel(root, path)})


def tag_outputs(root: Path, stage: str) -> None:
    """`dvc_out/<path>` = md5 of each small file output of `stage`, on the active run (what DVC will record)."""
    import mlflow

    for out in stage_outs(root, stage):
        path = root / out
        if path.is_file() and path.stat().st_size <= SMALL_FILE:
            mlflow.set_tag(f"dvc_out/{out}", file_md5(path))


def version_tags(root: Path, run_id: str, step: int | None, uri: str | None = None) -> dict[str, str]:
    """Where a model registered by a validate run came from: the training, units and k-means runs, the chosen
    checkpoint and DVC's hash of the units."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(run_id).data.tags
    iteration = tags.get("iteration", "")
    out: dict[str, str] = {}
    if train := tags.get(f"upstream/pretrain_it{iteration}"):
        out["train_run_id"] = train
        if kmeans := client.get_run(train).data.tags.get(f"upstream/kmeans_it{iteration}"):
            out["kmeans_run_id"] = kmeans
    if units := tags.get(f"upstream/units_it{iteration}"):
        out["units_run_id"] = units
    lock = Lock(root)
    for dep in stage_deps(root, tags.get("dvc_stage", "")):
        found = lock.producer(dep)
        if found and found[2] == f"units_it{iteration}":
            out["units"] = found[1]
        if found and found[2] == f"pretrain_it{iteration}" and step is not None:
            out |= _checkpoint(root, found[0], step)
    return out


def _checkpoint(root: Path, folder: str, step: int) -> dict[str, str]:
    for path in sorted((root / folder).glob("step_*.pt")):
        if path.stem.removeprefix("step_").isdigit() and int(path.stem.removeprefix("step_")) == step:
            rel = f"{folder}/{path.name}"
            md5 = Lock(root).hash(rel)
            return {"checkpoint": rel} | ({"checkpoint_md5": md5} if md5 else {})
    return {}


def system_metrics(stage: str) -> bool:
    """Whether the run of `stage` logs system metrics (CPU, memory, GPU): the feature, k-means, training and
    validation runs. MLflow samples every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)."""
    return stage.startswith(SYSTEM_METRICS_STAGES)
