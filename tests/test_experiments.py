"""DVC experiments run their own code and record what ran: queued, temporary, and every process a stage starts.

The editable install is simulated by PYTHONPATH pointing at the workspace's (or a decoy's) `src/`: without the
stages' bootstrap (`stages/_checkout.py`), a stage running in `.dvc/tmp/exps/...` would import that one instead.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import tone, write_wav
from mlflow.entities import Run

from hubert_pipeline.launch import _library_path_line
from hubert_pipeline.tracking import code_digest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("manifest", "mfcc", "kmeans_it1")  # the reduced pipeline: the real stages, on six seconds of audio
TINY = {
    "data": {"train": "audio/train", "valid": "audio/valid"},  # committed to git (data/ is ignored)
    "execution": {"workers": 1, "device": "cpu"},
    "mfcc": {"num_shards": 1},
    "kmeans": {"k_it1": 4, "n_init": 1, "fit_fraction": 1.0, "max_iter": 5},
}
WORKSPACE_EDIT = '\nraise RuntimeError("the workspace\'s kmeans.py ran")\n'


def git(root: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], root).stdout.strip()


def run(
    cmd: list[str], root: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`cmd` in `root`; a failure, or a command still running after `timeout` s (a DVC queue worker stuck), fails
    the test naming the command, rather than holding the whole suite."""
    env = env or clean_env(root)
    try:
        result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)} still ran after {timeout} s:\n{e.stdout!r}\n{e.stderr!r}") from e
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def clean_env(root: Path) -> dict[str, str]:
    """No DVC or MLflow variables of ours; PYTHONPATH plays the editable install resolving to the workspace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"PYTHONPATH": str(root / "src")}


def copy_checkout(root: Path) -> None:
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))


def reduced_project(root: Path, stages: tuple[str, ...], tiny: dict[str, dict], files: int = 6) -> Path:
    """A git + DVC repository at `root` with the real stages named (dvc.yaml's definitions), params.yaml updated
    with `tiny`, and `files` one-second tones (two thirds train, the rest valid) committed to git under audio/."""
    root.mkdir()
    copy_checkout(root)
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    reduced = {"stages": {name: dvc["stages"][name] for name in stages}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(reduced, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for i in range(files):
        split = "train" if i < files * 2 // 3 else "valid"
        write_wav(root / "audio" / split / f"spk{i}_utt.wav", tone(1.0, freq=150.0 + 60 * i, seed=i))
    git(root, "init", "-q")
    run(["dvc", "init", "-q"], root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A git + DVC repository with the real manifest, mfcc and kmeans_it1 stages on six one-second files; its queue's
    workers (detached processes) are stopped afterwards, whatever the test did."""
    root = reduced_project(tmp_path / "project", STAGES, TINY)
    yield root
    if (root / ".dvc" / "tmp" / "exps" / "celery").exists():
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, env=clean_env(root), capture_output=True,
                       timeout=120, check=False)  # fmt: skip


def runs_of(root: Path, experiment: str) -> dict[str, Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list",
                              filter_string=f"tags.dvc_experiment = '{experiment}'")  # fmt: skip
    return {r.data.tags["stage"]: r for r in runs}


def run_queue(root: Path, jobs: int, timeout: float = 900) -> dict[str, str]:
    """`dvc queue start -j N`, then wait for the queue to empty and its workers to stop: {experiment: status}."""
    run(["dvc", "queue", "start", "-j", str(jobs)], root)
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], root, timeout=120).stdout
        if not any(state in status for state in ("Queued", "Running")) and "0 active" in status:
            break
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
        time.sleep(2)
    rows = [line.split() for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
    return {row[1]: row[-1] for row in rows}


def assert_ran_its_own_code(
    runs: dict, *, experiment: str, baseline: str, digest: str, workspace: Path, mfcc_runs: set[str]
) -> None:
    """Every stage that ran in the experiment (the others restored from DVC's run cache) ran its code; kmeans_it1's
    lineage names the MFCC run of the features it read, wherever that ran (`mfcc_runs`)."""
    assert "kmeans_it1" in runs, sorted(runs)
    assert set(runs) <= set(STAGES), sorted(runs)
    for stage, r in runs.items():
        tags = r.data.tags
        assert r.info.run_name == f"{experiment}/{stage}"
        assert tags["git_revision"] == baseline
        assert tags["code_digest"] == digest, f"{stage} ran other code than the experiment's"
        assert tags["git_dirty"] == "true"
        assert {"params.yaml", "src/hubert_pipeline/kmeans.py"} <= set(tags["git_changes"].split(", "))
        assert ".dvc/tmp/exps" in tags["code_root"], f"{stage} imported {tags['code_root']}"
        assert Path(tags["dvc_root"]) == workspace
    kmeans = runs["kmeans_it1"].data.tags  # lineage read in the experiment's copy: its dvc.lock, the user's cache
    assert kmeans["upstream/mfcc"] in mfcc_runs
    assert kmeans["dvc_dep/outputs/features/mfcc/train"].endswith(".dir")


@pytest.mark.slow
def test_a_queued_sweep_runs_the_code_it_was_queued_with_not_a_later_workspace_edit(project):
    kmeans_py = project / "src" / "hubert_pipeline" / "kmeans.py"
    kmeans_py.write_text(kmeans_py.read_text() + "# an uncommitted change, queued with the experiments\n")
    queued_digest = code_digest(project)
    baseline = git(project, "rev-parse", "HEAD")
    run(["dvc", "exp", "run", "--queue", "-S", "kmeans.k_it1=5,6", "kmeans_it1"], project)  # a grid: two experiments
    kmeans_py.write_text(kmeans_py.read_text() + WORKSPACE_EDIT)  # would fail the experiments, were it imported
    status = run_queue(project, jobs=1)  # one worker: several can jam DVC's file broker
    assert sorted(status.values()) == ["Success", "Success"], [run(["dvc", "queue", "logs", name], project).stdout
                                                               for name in status]  # fmt: skip
    runs = {name: runs_of(project, name) for name in status}
    ran = sorted(stage for stages in runs.values() for stage in stages)
    assert ran == ["kmeans_it1", "kmeans_it1", "manifest", "mfcc"], ran  # the second restores the first's upstream
    mfcc_runs = {r["mfcc"].info.run_id for r in runs.values() if "mfcc" in r}
    for name, exp_runs in runs.items():
        assert_ran_its_own_code(exp_runs, experiment=name, baseline=baseline, digest=queued_digest, workspace=project,
                                mfcc_runs=mfcc_runs)  # fmt: skip
    assert {r["kmeans_it1"].data.metrics["k"] for r in runs.values()} == {5, 6}
    assert code_digest(project) != queued_digest


@pytest.mark.slow
def test_temp_experiment_imports_its_temporary_copy_not_the_workspace(project):
    kmeans_py = project / "src" / "hubert_pipeline" / "kmeans.py"
    kmeans_py.write_text(kmeans_py.read_text() + "# an uncommitted change, carried into the copy\n")
    digest = code_digest(project)
    baseline = git(project, "rev-parse", "HEAD")
    run(["dvc", "exp", "run", "--temp", "-n", "k-six", "-S", "kmeans.k_it1=6", "kmeans_it1"], project)
    runs = runs_of(project, "k-six")
    assert set(runs) == set(STAGES)
    assert_ran_its_own_code(runs, experiment="k-six", baseline=baseline, digest=digest, workspace=project,
                            mfcc_runs={runs["mfcc"].info.run_id})  # fmt: skip
    assert runs["kmeans_it1"].data.metrics["k"] == 6
    # The next one reuses the manifest from DVC's run cache, written in k-six's copy (gone now): it names the files
    # relative to the project, so the MFCC stage rerun here reads this copy's audio.
    run(["dvc", "exp", "run", "--temp", "-n", "shards", "-S", "mfcc.num_shards=2", "kmeans_it1"], project)
    assert set(runs_of(project, "shards")) == {"mfcc", "kmeans_it1"}


WHERE = """\
import _checkout  # noqa: F401
import json, subprocess, sys
from hubert_pipeline.launch import map_tasks
from hubert_pipeline.params import ExecutionParams
from hubert_pipeline.tracking import code_root

if __name__ == "__main__":
    child = [sys.executable, "-c", "import hubert_pipeline, pathlib; print(pathlib.Path(hubert_pipeline.__file__))"]
    workers = map_tasks(code_root, [{}, {}], execution=ExecutionParams(workers=2), desc="where")
    print(json.dumps({"stage": str(code_root()), "workers": [str(w) for w in workers],
                      "subprocess": subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip()}))
"""


@pytest.mark.slow
def test_a_stage_and_the_processes_it_starts_import_the_library_of_the_stage_files_checkout(tmp_path):
    checkout, decoy = tmp_path / "checkout", tmp_path / "decoy"
    for root in (checkout, decoy):
        root.mkdir()
        copy_checkout(root)
    (checkout / "stages" / "where.py").write_text(WHERE)
    env = clean_env(decoy)  # the editable install resolves elsewhere
    out = json.loads(run([sys.executable, "stages/where.py"], checkout, env).stdout.splitlines()[-1])
    assert out["stage"] == str(checkout)
    assert out["workers"] == [str(checkout), str(checkout)]  # spawned worker processes
    assert out["subprocess"] == str(checkout / "src" / "hubert_pipeline" / "__init__.py")


def test_slurm_jobs_put_the_stages_library_first_on_their_python_path():
    line = _library_path_line()
    assert line.startswith(f"export PYTHONPATH={REPO / 'src'}")
    result = subprocess.run(["bash", "-c", f"{line}; echo $PYTHONPATH"], capture_output=True, text=True, check=True,
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": "/elsewhere"})  # fmt: skip
    assert result.stdout.strip() == f"{REPO / 'src'}:/elsewhere"
