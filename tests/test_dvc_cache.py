"""The project's DVC cache choice (.dvc/config: `cache.type = hardlink,symlink`) on a reduced pipeline, for real.

Every cached output is one file on disk (the cache's, hard-linked or symlinked into the workspace), the cache's
files still hash to their names after a resumed `persist` training, and `dvc checkout`, `dvc exp run -S` and
`dvc exp apply` restore what they should.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from test_experiments import REPO, TINY, git, reduced_project, run

STAGES = ("manifest", "mfcc", "kmeans_it1", "units_it1", "pretrain_it1")
TRAIN = {"max_steps": 4, "warmup_steps": 1, "save_interval": 2, "log_interval": 2, "num_workers": 0,
         "min_sample_size": 8000, "max_sample_size": 16000, "max_batch_samples": 64000}  # fmt: skip
CENTROIDS = Path("outputs/kmeans/it1/centroids.safetensors")
CHECKPOINTS = Path("outputs/pretrain/it1/checkpoints")


def cache_path(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def uncached(root: Path) -> set[str]:
    """Outputs declared `cache: false` in dvc.yaml (metrics, plots): git's, not the cache's."""
    found = set()
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for key in ("outs", "metrics", "plots"):
            found |= {path for entry in stage.get(key, []) if isinstance(entry, dict)
                      for path, options in entry.items() if options.get("cache") is False}  # fmt: skip
    return found


def cached_files(root: Path) -> dict[Path, str]:
    """Workspace path -> md5 of every file of every cached output in dvc.lock."""
    files, skip = {}, uncached(root)
    for stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in skip:
                continue
            if out["md5"].endswith(".dir"):
                listing = json.loads(cache_path(root, out["md5"]).read_text())
                files |= {root / out["path"] / entry["relpath"]: entry["md5"] for entry in listing}
            else:
                files[root / out["path"]] = out["md5"]
    return files


def assert_stored_once_and_intact(root: Path) -> None:
    """Each output file is its cache file (same inode, or a symlink to it), and every cache file hashes to its name."""
    files = cached_files(root)
    assert any(path.parent.name == "checkpoints" for path in files)
    for path, md5 in files.items():
        cached = cache_path(root, md5)
        if path.is_symlink():
            assert path.resolve() == cached.resolve(), path
        else:
            assert path.stat().st_ino == cached.stat().st_ino, f"{path} is a copy of {cached}"
    for cached in (root / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        if not cached.name.endswith(".dir"):
            assert hashlib.md5(cached.read_bytes()).hexdigest() == cached.parent.name + cached.name, cached


def num_centroids(root: Path) -> int:
    with safe_open(str(root / CENTROIDS), "pt") as f:
        return f.get_tensor(f.keys()[0]).shape[0]


def set_params(root: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_outputs_are_linked_once_and_the_cache_survives_resume_experiments_and_checkout(tmp_path):
    tiny = TINY | {"data": TINY["data"] | {"alignments": ""}, "train_it1": TRAIN}  # no alignments: no unit metrics
    root = reduced_project(tmp_path / "p", STAGES, tiny)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's cache choice
    git(root, "commit", "-qam", "cache config")
    run(["dvc", "repro"], root)
    assert_stored_once_and_intact(root)

    set_params(root, "train_it1", max_steps=6)  # the persist output resumes into its linked checkpoints
    resumed = run(["dvc", "repro"], root)
    assert f"resuming from {CHECKPOINTS}/step_00000004.pt" in resumed.stderr
    assert max(p.name for p in (root / CHECKPOINTS).glob("*.pt")) == "step_00000006.pt"
    assert_stored_once_and_intact(root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline run")

    out = run(["dvc", "exp", "run", "-n", "k-three", "-S", "kmeans.k_it1=3"], root).stdout
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"kmeans_it1", "units_it1", "pretrain_it1"}
    assert num_centroids(root) == 3
    assert_stored_once_and_intact(root)

    git(root, "checkout", "--", ".")  # back to the baseline's params and lock: its outputs come from the cache
    run(["dvc", "checkout"], root)
    assert num_centroids(root) == TINY["kmeans"]["k_it1"]
    assert_stored_once_and_intact(root)
    run(["dvc", "exp", "apply", "k-three"], root)
    assert num_centroids(root) == 3
    assert "up to date" in run(["dvc", "status"], root).stdout
    assert_stored_once_and_intact(root)

    for large in ("outputs/features", CHECKPOINTS):  # the MFCC store and the checkpoints, restored as links
        shutil.rmtree(root / large)
    run(["dvc", "checkout"], root)
    assert "up to date" in run(["dvc", "status"], root).stdout
    assert_stored_once_and_intact(root)
