"""SLURM for real: a single-node cluster on loopback (slurm/local-cluster.sh: munged + slurmctld + slurmd from
Debian's slurm-wlm), the real dvc.yaml in two temporary projects, one run by the local executor and one through
SLURM with the local-test profile; their outputs must be equal."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import tracking_server

REPO = Path(__file__).resolve().parents[1]
STATE = Path("/tmp/hubert-pipeline-slurm")  # where slurm/profiles/local-test.yaml expects the cluster
PROFILE = "slurm/profiles/local-test.yaml"
TINY = {
    "demo": {"train_minutes": 1.0, "valid_minutes": 0.3, "abx_minutes": 0.3},
    "mfcc": {"num_shards": 4},  # a 4-task array
    "kmeans": {"k_it1": 20, "n_init": 1, "fit_fraction": 0.5},
    "train_it1": {"max_steps": 8, "warmup_steps": 2, "save_interval": 4, "log_interval": 2, "num_workers": 0,
                  "processes": 2},  # locally 2 processes; on SLURM 2 tasks (the profile's tasks_per_node)
}  # fmt: skip

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))} | (env or {})
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def cluster():
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(exe) is None]
    if missing or os.geteuid() != 0:
        why = f"missing {missing}" if missing else "not root"
        if os.environ.get("CI"):
            pytest.fail(f"the SLURM tests need Debian's slurm-wlm and munge, and root ({why}): bash run.sh setup")
        pytest.skip(f"no local SLURM cluster ({why}); bash run.sh setup installs slurm-wlm and munge")
    already = (STATE / "slurmctld.pid").is_file() and subprocess.run(
        ["kill", "-0", (STATE / "slurmctld.pid").read_text().strip()], capture_output=True, check=False
    ).returncode == 0
    subprocess.run(["bash", REPO / "slurm" / "local-cluster.sh", "start", STATE], check=True)
    os.environ["SLURM_CONF"] = str(STATE / "slurm.conf")
    yield STATE / "slurm.conf"
    if not already:
        subprocess.run(["bash", REPO / "slurm" / "local-cluster.sh", "stop", STATE], check=False)


def make_project(root: Path, *, slurm: bool, extra: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src", "slurm"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mlruns").mkdir()  # the checkout's tracked folder, not a developer's store in it
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in (TINY | (extra or {})).items():
        params[section].update(values)
    if slurm:
        params["execution"]["executor"] = "slurm"
        params["execution"]["slurm"]["profile"] = PROFILE
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(scope="module")
def projects(cluster, tmp_path_factory):
    local = make_project(tmp_path_factory.mktemp("local"), slurm=False)
    on_slurm = make_project(tmp_path_factory.mktemp("slurm"), slurm=True)
    run(["dvc", "repro", "units_it1"], local)
    shutil.copytree(local / "data", on_slurm / "data")  # the same corpus: its stage is not a heavy one
    run(["dvc", "commit", "-f", "demo_corpus"], on_slurm)
    out = run(["dvc", "repro", "units_it1"], on_slurm)
    return local, on_slurm, out.stdout + out.stderr


def job_logs(project: Path, stage: str) -> list[Path]:
    return sorted((project / "logs" / "slurm" / stage).glob("*_log.out"))


def test_units_it1_through_slurm_equal_the_local_executor(projects):
    local, on_slurm, log = projects
    assert "submitted 4 task(s) as SLURM job" in log  # mfcc train: a 4-task array
    assert len(job_logs(on_slurm, "mfcc")) == 8  # train + valid, 4 array tasks each
    assert job_logs(on_slurm, "kmeans_it1")
    assert job_logs(on_slurm, "units-train")
    for split in ("train", "valid"):
        store = Path("outputs/features/mfcc") / split
        shards = sorted(p.name for p in (local / store).iterdir())
        assert shards == sorted(p.name for p in (on_slurm / store).iterdir())
        for name in shards:
            if name.endswith(".npy"):
                assert np.array_equal(np.load(local / store / name), np.load(on_slurm / store / name)), name
        units = Path("outputs/units/it1") / f"{split}.jsonl"
        rows = [[(r["fileid"], r["units"]) for r in map(json.loads, (p / units).read_text().splitlines())]
                for p in (local, on_slurm)]  # fmt: skip
        assert rows[0] == rows[1]  # the paths differ: two project folders
    from safetensors.torch import load_file

    a = load_file(local / "outputs/kmeans/it1/centroids.safetensors")
    b = load_file(on_slurm / "outputs/kmeans/it1/centroids.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_encode_as_a_slurm_array_equals_the_local_encode(projects, tmp_path):
    from test_encode import make_encoder_parts

    _, on_slurm, _ = projects
    parts = make_encoder_parts(tmp_path / "encoder")
    common = [sys.executable, "-m", "hubert_pipeline.encode", "data/demo/wav/train", "--model", parts.checkpoint,
              "--layer", str(parts.layer), "--centroids", parts.centroids, "--chunk-files", "2"]  # fmt: skip
    run([*common, str(tmp_path / "local"), "--workers", "1"], on_slurm)
    out = run([*common, str(tmp_path / "slurm"), "--executor", "slurm", "--shards", "3"], on_slurm)
    assert "submitted 3 task(s) as SLURM job" in out.stdout + out.stderr
    assert (tmp_path / "slurm" / "units.jsonl").read_text() == (tmp_path / "local" / "units.jsonl").read_text()
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("local", "slurm")]
    assert meta[0]["files"] == meta[1]["files"] > 6  # more files than three 2-file chunks
    assert meta[0]["provenance"] == meta[1]["provenance"]


def test_two_task_training_job_runs_ddp_and_equals_two_local_processes(projects):
    local, on_slurm, _ = projects
    run(["dvc", "repro", "pretrain_it1"], local)
    with tracking_server() as (uri, _):  # the job logs to a team's server (PostgreSQL) over HTTP
        out = run(["dvc", "repro", "pretrain_it1"], on_slurm, env={"MLFLOW_TRACKING_URI": uri})
        mlflow.set_tracking_uri(uri)
        (train,) = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list")
        history = mlflow.MlflowClient().get_metric_history(train.info.run_id, "train_loss")
        assert [m.step for m in history] == [2, 4, 6, 8]  # logged by rank 0 of the SLURM job
    assert "1 node(s) x 2 task(s)" in out.stdout + out.stderr
    logs = job_logs(on_slurm, "pretrain_it1")
    assert len(logs) == 2  # two tasks of one job
    for step in (4, 8):
        name = f"outputs/pretrain/it1/checkpoints/step_{step:08d}.pt"
        a = torch.load(local / name, map_location="cpu", weights_only=True)
        b = torch.load(on_slurm / name, map_location="cpu", weights_only=True)
        assert a["world_size"] == b["world_size"] == 2
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def squeue_ids(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_cancelled_array_task_fails_the_stage_with_its_log_path(projects, tmp_path):
    local, _, _ = projects
    project = make_project(tmp_path, slurm=True)
    shutil.copytree(local / "outputs" / "manifests", project / "outputs" / "manifests")
    shutil.copytree(local / "data", project / "data")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["execution"]["slurm"]["setup"] = ["sleep 20"]  # every task waits: time to cancel one
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    stage = subprocess.Popen(
        ["python", "stages/mfcc.py", "outputs/manifests", "outputs/features/mfcc"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(lambda: len(squeue_ids("hubert-mfcc")) == 4, what="the 4 array tasks in squeue")
    victim = sorted(squeue_ids("hubert-mfcc"))[1]
    subprocess.run(["scancel", victim], check=True)
    output, _ = stage.communicate(timeout=180)
    assert stage.returncode != 0
    message = re.search(r"TaskError: (.*)", output)
    assert message, output[-3000:]
    assert f"SLURM job {victim}" in message.group(1)
    assert "CANCELLED" in message.group(1)
    log_match = re.search(r"log: (\S+)", message.group(1))
    assert log_match, message.group(1)
    log = log_match.group(1)
    assert log.startswith(str(project / "logs" / "slurm" / "mfcc"))
    assert log.endswith("_log.err")
    assert not (project / "outputs/features/mfcc/train/meta.json").exists()  # never taken for complete
    wait_for(lambda: not squeue_ids("hubert-mfcc"), what="the other tasks to be cancelled")


def project_with_units(local: Path, root: Path, *, slurm: bool, train: dict) -> Path:
    """A project whose stages up to units_it1 are those of `local` (committed, not rerun)."""
    project = make_project(root, slurm=slurm, extra={"train_it1": TINY["train_it1"] | train})
    shutil.copytree(local / "data", project / "data")
    shutil.copytree(local / "outputs", project / "outputs", ignore=shutil.ignore_patterns("pretrain"))
    shutil.copytree(local / "metrics", project / "metrics")
    for stage in ("demo_corpus", "manifest", "mfcc", "kmeans_it1", "units_it1"):
        run(["dvc", "commit", "-f", stage], project)
    return project


def test_preempted_training_checkpoints_requeues_and_resumes(projects, tmp_path):
    local, _, _ = projects
    train = {"max_steps": 12, "save_interval": 6}
    reference = project_with_units(local, tmp_path / "reference", slurm=False, train=train)
    run(["dvc", "repro", "pretrain_it1"], reference)  # uninterrupted, 2 local processes
    project = project_with_units(local, tmp_path / "preempted", slurm=True, train=train)
    ckpts = project / "outputs" / "pretrain" / "it1" / "checkpoints"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    stage = subprocess.Popen(["dvc", "repro", "pretrain_it1"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for((ckpts / "step_00000006.pt").exists, timeout=300, what="the first checkpoint")
    (job_id,) = set(squeue_ids("hubert-pretrain_it1"))
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends before a time-out
    output, _ = stage.communicate(timeout=600)
    assert stage.returncode == 0, output[-5000:]
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    restarts = re.search(r"Restarts=(\d+)", info)
    assert restarts, info
    assert int(restarts.group(1)) >= 1  # requeued
    steps = sorted(int(p.stem.removeprefix("step_")) for p in ckpts.glob("step_*.pt"))
    extra = [s for s in steps if s % 6]
    assert len(extra) == 1  # the checkpoint taken on the signal
    assert 6 < extra[0] < 12
    log = "".join(p.read_text() for p in sorted((project / "logs/slurm/pretrain_it1").glob("*_log.*")))
    assert "received SIGUSR2: checkpointing at the end of this step" in log
    assert "Requeued job" in log  # submitit's checkpointing
    assert f"resuming from outputs/pretrain/it1/checkpoints/step_{extra[0]:08d}.pt" in log
    # resumed equals uninterrupted
    a = torch.load(reference / "outputs/pretrain/it1/checkpoints/step_00000012.pt", map_location="cpu",
                   weights_only=True)  # fmt: skip
    b = torch.load(ckpts / "step_00000012.pt", map_location="cpu", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_rerun_after_the_submitting_process_died_waits_for_the_running_job(projects, tmp_path):
    local, _, _ = projects
    # long enough that the job still runs when the rerun looks for it (the log-mel demo model trains fast)
    project = project_with_units(local, tmp_path, slurm=True, train={"max_steps": 150, "save_interval": 50})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    first = subprocess.Popen(["dvc", "repro", "pretrain_it1"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    wait_for(lambda: bool(squeue_ids("hubert-pretrain_it1")), what="the training job")
    (job_id,) = set(squeue_ids("hubert-pretrain_it1"))
    os.killpg(first.pid, signal.SIGKILL)  # the submitting process dies; the job goes on
    first.wait()
    out = run(["dvc", "repro", "pretrain_it1"], project)
    assert f"SLURM job {job_id} of an earlier submission" in out.stdout + out.stderr
    assert "submitted SLURM job" not in out.stdout + out.stderr
    record = json.loads((project / "logs/slurm/pretrain_it1/jobs.json").read_text())
    assert record["job_ids"] == [job_id]
    assert (project / "outputs/pretrain/it1/checkpoints/step_00000150.pt").exists()


def test_mfcc_sbatch_script_gives_the_pipeline_store(projects, tmp_path):
    local, _, _ = projects
    manifest = local / "outputs/manifests/train.csv"
    store = tmp_path / "store"
    (tmp_path / "logs/slurm/sbatch").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    subprocess.run(["sbatch", "--wait", "--array=0-3", "--cpus-per-task=1", "--mem=1G", REPO / "slurm/mfcc.sbatch",
                    manifest, store], cwd=tmp_path, env=env, check=True, capture_output=True)  # fmt: skip
    assert not (store / "meta.json").exists()  # shards only: not yet a complete store
    subprocess.run([sys.executable, "-m", "hubert_pipeline.features", manifest, store, "--num-shards", "4"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)  # fmt: skip
    ref = local / "outputs/features/mfcc/train"
    for path in sorted(ref.glob("*.npy")):
        assert np.array_equal(np.load(path), np.load(store / path.name)), path.name
    assert json.loads((store / "meta.json").read_text()) == json.loads((ref / "meta.json").read_text())
