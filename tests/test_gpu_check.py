"""bench/gpu_check.py runs where only torch, numpy, safetensors, numba and scikit-learn are installed.

Here those other packages are installed, so they are blocked: a sitecustomize on PYTHONPATH puts a finder first on
sys.meta_path that refuses them, in the checked process and in every process it starts.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("dvc", "mlflow", "polars", "torchcodec", "submitit", "torchaudio", "transformers", "fastabx", "matplotlib")
SITECUSTOMIZE = f"""
import sys
from importlib.machinery import PathFinder

BLOCKED = {BLOCKED!r}


class Blocker:
    \"\"\"Refuses the blocked packages, except the check's stand-ins (a folder named shims on the path).\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        shims = [p for p in (path or sys.path) if "shims" in str(p)]
        if shims and (spec := PathFinder.find_spec(name, shims)) is not None:
            return spec
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)", name=name)


sys.meta_path.insert(0, Blocker())
"""
IMPORTS = """
import runpy, sys
import hubert_pipeline.checkpoint, hubert_pipeline.data, hubert_pipeline.features, hubert_pipeline.flops
import hubert_pipeline.kmeans, hubert_pipeline.model, hubert_pipeline.step, hubert_pipeline.train
import hubert_pipeline.mfcc_cpu, hubert_pipeline.mfcc_torch
import minimal_hubert.model, minimal_hubert.train, spidr.tools  # the reference, as the throughput bench imports it
from hubert_pipeline.params import TrainParams
runpy.run_path("bench/train_throughput.py", run_name="train_throughput")
for name in ("mlflow", "dvc", "polars", "torchaudio", "submitit", "torchcodec"):
    try:
        module = __import__(name)
    except ModuleNotFoundError:
        continue
    assert "shims" in module.__file__, name + " was not blocked"  # gpu_check's stand-in, not the package
print("imports ok")
"""


def blocked_run(
    tmp_path: Path, command: list[str], timeout: float, *, shims: bool = False
) -> subprocess.CompletedProcess:
    """`command` with BLOCKED refused; `shims`: with gpu_check's stand-ins last on the path, as it runs its parts."""
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = [str(tmp_path / "blocker")]
    if shims:
        gpu_check = runpy.run_path(str(ROOT / "bench" / "gpu_check.py"), run_name="gpu_check")
        gpu_check["write_shims"](tmp_path / "shims", [n for n in gpu_check["SHIMS"] if n.split(".")[0] in BLOCKED])
        path.append(str(tmp_path / "shims"))
    env = {"PYTHONPATH": os.pathsep.join(path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_model_data_step_and_the_check_scripts_import_without_the_pipeline_s_shell_packages(tmp_path):
    done = blocked_run(tmp_path, [sys.executable, "-c", IMPORTS], timeout=300, shims=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imports ok" in done.stdout


@pytest.mark.slow
def test_the_gpu_check_runs_to_its_report_on_the_cpu_without_those_packages(tmp_path):
    report = tmp_path / "check.md"
    done = blocked_run(tmp_path, [sys.executable, "bench/gpu_check.py", "--dry-run", "--report", str(report)],
                       timeout=1500)  # fmt: skip
    assert report.is_file(), done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report.read_text()[-4000:]
    assert "torchrun_train: ok" in report.read_text()
