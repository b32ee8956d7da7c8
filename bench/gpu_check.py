"""One GPU check, at most 6 minutes on one GPU, written to a report (Markdown, and JSON beside it).

    python bench/gpu_check.py --report gpu_check.md              # on a GPU machine, from the repository root
    python bench/gpu_check.py --dry-run --report /tmp/check.md   # CPU: tiny sizes, the same plumbing (tests use it)

Sections, each in a subprocess under its share of the time budget (a failure is reported, the rest still runs):
1. `gpu` tests: `pytest -m gpu tests/test_gpu.py` (NCCL, fused AdamW, flash attention, bf16 and compiled steps);
2. training throughput, Base, the same 30 s batch for ours and minimal_hubert's, bf16 autocast, compile off and on
   (bench/train_throughput.py): audio s / s, MFU (hubert_pipeline.flops against the GPU's dense bf16 peak), peak
   memory, and the ratio;
3. MFCC and k-means on CUDA against CPU on the same input: equal outputs within float32 rounding, and the ratio;
4. `torchrun --nproc-per-node 1 -m hubert_pipeline.train` on synthetic audio: NCCL set-up, the CLI, 6 steps.

It needs torch, numpy, safetensors, numba and scikit-learn, plus our source and pure-Python wheels (spidr,
minimal-hubert, tqdm, pyyaml, pytest) on PYTHONPATH; not dvc, mlflow, polars, torchcodec, submitit or torchaudio.
Our modules import none of those at the top; but minimal_hubert imports wandb, orjson, huggingface_hub, torchaudio
and (through spidr.train) submitit, and spidr.data polars and torchcodec, at the top of modules whose code the
check does not run: where those are missing, stand-ins are put last on the children's path (SHIMS; in the report).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 360
_RAISE = "raise RuntimeError('a stand-in: not installed here')\n"
_REFUSE = f"    def __init__(self, *args, **kwargs):\n        {_RAISE}"
SHIMS = {  # module -> source of a stand-in: the names imported at the top of modules whose code the check never runs
    "wandb": "",  # minimal_hubert.train, spidr.train
    "orjson": "import json\n\nloads = json.loads\n",  # minimal_hubert.data
    "huggingface_hub": "class PyTorchModelHubMixin:\n    def __init_subclass__(cls, **kwargs):\n        pass\n",
    "huggingface_hub.errors": "class HFValidationError(ValueError):\n    pass\n",
    "torchcodec": "",  # spidr.data.utils; our data path reads 16-bit WAVs with the standard library
    # minimal_hubert.compatibility (fairseq checkpoint conversion, which the check does not use)
    "torchaudio": "",
    "torchaudio.models": "",
    "torchaudio.models.wav2vec2": "",
    "torchaudio.models.wav2vec2.utils": "",
    "torchaudio.models.wav2vec2.utils.import_fairseq": f"def _convert_state_dict(*args, **kwargs):\n    {_RAISE}",
    # spidr.slurm, through minimal_hubert.train -> spidr.train (SLURM launching: the check launches nothing there)
    "submitit": "from . import helpers\n",
    "submitit.helpers": "def clean_env():\n    return lambda fn: fn\n\n\nclass DelayedSubmission:\n    pass\n",
    "submitit.core": "",
    "submitit.core.utils": "class FailedJobError(RuntimeError):\n    pass\n",
    # spidr.data.utils (its manifest reader, which we do not use; `-> pl.DataFrame` is evaluated at import)
    "polars": f"class DataFrame:\n{_REFUSE}",
    "torchcodec.decoders": f"class AudioDecoder:\n{_REFUSE}\n\nclass WavDecoder:\n{_REFUSE}",
}


def missing_shims() -> list[str]:
    """The modules of SHIMS whose package is not installed (or refused by a finder)."""
    missing = []
    for name in SHIMS:
        try:
            present = find_spec(name.split(".")[0]) is not None
        except ImportError:  # a finder that refuses the name (tests block modules so)
            present = False
        if not present:
            missing.append(name)
    return missing


def write_shims(folder: Path, names: list[str]) -> None:
    """Stand-ins for `names` (modules of SHIMS) as packages under `folder`, which goes last on the children's path."""
    for name in names:
        path = folder / Path(*name.split("."))
        path.mkdir(parents=True, exist_ok=True)
        (path / "__init__.py").write_text(SHIMS[name])


class Check:
    """The sections' results and the time left; each section runs as `python -c`/a script under a timeout."""

    def __init__(self, args: argparse.Namespace, shim_dir: Path) -> None:
        self.args, self.start, self.results = args, time.monotonic(), {}
        paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", ""), str(shim_dir)]
        self.env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}

        self.budget = BUDGET_S * (4 if args.dry_run else 1)  # a shared CPU is slower than the GPU machine

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], share: float) -> subprocess.CompletedProcess | None:
        share *= 4 if self.args.dry_run else 1
        timeout = max(5.0, min(share, self.left()))
        began = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            self.results[name] = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
            return None
        self.results[name] = {"ok": done.returncode == 0, "seconds": round(time.monotonic() - began, 1)}
        if done.returncode != 0:
            self.results[name]["error"] = (done.stdout + done.stderr)[-3000:]
        return done


def gpu_tests(check: Check) -> None:
    if find_spec("pytest") is None:
        check.results["gpu_tests"] = {"ok": False, "error": "pytest is not installed: carry its wheel"}
        return
    done = check.run("gpu_tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA",
                                   "-p", "no:cacheprovider"], share=100)  # fmt: skip
    if done is not None:
        check.results["gpu_tests"]["summary"] = [line for line in done.stdout.splitlines() if line.strip()][-8:]


def throughput(check: Check, *, compile_model: bool) -> None:
    name = f"throughput_compile_{'on' if compile_model else 'off'}"
    dry = check.args.dry_run
    command = [sys.executable, "bench/train_throughput.py", "--json", "--no-breakdown", "--device",
               "cpu" if dry else "cuda", "--size", "tiny" if dry else "base", "--batch-seconds", "4" if dry else "30",
               "--warmup", "1" if dry else "3", "--steps", "1" if dry else "5",
               "--repeats", "1" if dry else "2"]  # fmt: skip
    done = check.run(name, command + (["--compile"] if compile_model else []), share=150 if compile_model else 70)
    if done is None or done.returncode != 0:
        return
    summary = json.loads(done.stdout)
    from hubert_pipeline.flops import peak_flops, train_step_flops
    from hubert_pipeline.model_config import HubertConfig

    b = summary["batch"]
    flops = train_step_flops(HubertConfig.preset(summary["args"]["size"]), summary["args"]["num_classes"],
                             batch=b["utterances"], samples=round(16_000 * b["audio_seconds"] / b["utterances"]),
                             masked_frames=b["masked_frames"])  # fmt: skip
    peak = peak_flops(summary["env"]["device_name"])
    for impl in ("ours", "ref"):
        rate = summary[impl]["audio_per_s"] / b["audio_seconds"] * flops
        check.results[name][impl] = {
            "audio_per_s": round(summary[impl]["audio_per_s"], 1),
            "model_tflops_per_s": round(rate / 1e12, 3),
            "mfu": None if peak is None else round(rate / peak, 4),
            "peak_memory_mib": round(summary[impl]["memory"]["peak_mib"]),
        }
    check.results[name] |= {"ratio": round(summary["throughput_ratio"], 3), "device": summary["env"]["device_name"],
                            "batch": b, "torch": summary["env"]["torch"]}  # fmt: skip


MFCC_KMEANS = """
import json, time, numpy as np, torch
from torch.testing import assert_close
from hubert_pipeline.features import mfcc_batch
from hubert_pipeline.kmeans import _lloyd, predict
dry = {dry}
device = "cpu" if dry else "cuda"
sync = (lambda: None) if dry else torch.cuda.synchronize
rng = np.random.default_rng(0)
waves = [(0.1 * rng.standard_normal(16_000 * (4 if dry else 10))).astype(np.float32) for _ in range(4 if dry else 64)]
def timed(fn):
    fn(); sync(); t = time.perf_counter(); out = fn(); sync(); return out, time.perf_counter() - t
cpu, t_cpu = timed(lambda: mfcc_batch(waves, device="cpu"))
gpu, t_gpu = timed(lambda: [m.cpu() for m in mfcc_batch(waves, device=device)])
diff = max(float((a - b).abs().max()) for a, b in zip(cpu, gpu))
assert_close(torch.cat(gpu), torch.cat(cpu), rtol=1e-4, atol=1e-3)
x = torch.cat(cpu)
init = x[torch.from_numpy(rng.choice(len(x), 100, replace=False))]
def fit(dev):
    data = x.to(dev)
    return _lloyd(lambda: iter((data,)), init.to(dev), block=65536, max_iter=10, tol=0.0, desc=None)
(c_cpu, i_cpu, _), tk_cpu = timed(lambda: fit("cpu"))
(c_gpu, i_gpu, _), tk_gpu = timed(lambda: fit(device))
same = float((predict(x, c_cpu) == predict(x, c_gpu.cpu())).float().mean())
assert_close(c_gpu.cpu(), c_cpu, rtol=1e-3, atol=1e-3)
print(json.dumps({{"mfcc": {{"utterances": len(waves), "frames": len(x), "max_abs_diff": diff, "cpu_s": t_cpu,
    "gpu_s": t_gpu, "speedup": t_cpu / t_gpu}}, "kmeans": {{"k": 100, "iterations": 10, "inertia_cpu": i_cpu,
    "inertia_gpu": i_gpu, "same_assignment": same, "cpu_s": tk_cpu, "gpu_s": tk_gpu, "speedup": tk_cpu / tk_gpu}}}}))
"""


def mfcc_kmeans(check: Check) -> None:
    done = check.run("mfcc_kmeans", [sys.executable, "-c", MFCC_KMEANS.format(dry=check.args.dry_run)], share=60)
    if done is not None and done.returncode == 0:
        check.results["mfcc_kmeans"] |= json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_run(folder: Path, *, dry: bool) -> list[str]:
    """Seeded tones and random units (k=50) as 16-bit WAVs, a manifest and a params file; the train CLI's arguments."""
    import wave

    import numpy as np

    from hubert_pipeline.model_config import FAIRSEQ_CONV_LAYERS, conv_frames

    rng, rows = np.random.default_rng(0), []
    for i in range(8):
        n = 16_000 * (2 + i % 3)
        samples = 0.3 * np.sin(np.cumsum(2 * np.pi * rng.uniform(100, 400) / 16_000 * np.ones(n)))
        path = folder / f"utt{i}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16_000)
            w.writeframes((samples * 32767).astype("<i2").tobytes())
        rows.append({"fileid": path.stem, "path": str(path), "num_samples": n,
                     "units": rng.integers(0, 50, conv_frames(n, FAIRSEQ_CONV_LAYERS)).tolist()})  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"model": {"size": "tiny" if dry else "base"},
              "train_it1": {"max_steps": 6, "warmup_steps": 2, "save_interval": 3, "log_interval": 1,
                            "num_workers": 0, "min_sample_size": 16_000, "max_sample_size": 48_000,
                            "max_batch_samples": 96_000}}  # fmt: skip
    (folder / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    return [str(folder / "train.jsonl"), str(folder / "out"), "--num-classes", "50", "--params",
            str(folder / "params.yaml")]  # fmt: skip


def torchrun_train(check: Check, folder: Path) -> None:
    arguments = synthetic_run(folder, dry=check.args.dry_run)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "hubert_pipeline.train", *arguments]  # fmt: skip
    done = check.run("torchrun_train", command, share=70)
    if done is not None:
        saved = sorted(p.name for p in (folder / "out").glob("step_*.pt"))
        backend = "nccl" if not check.args.dry_run else "gloo"
        check.results["torchrun_train"] |= {"checkpoints": saved, "backend": backend,
                                            "log_tail": done.stderr.splitlines()[-4:]}  # fmt: skip
        check.results["torchrun_train"]["ok"] &= saved == ["step_00000003.pt", "step_00000006.pt"]


def write_report(check: Check, path: Path, shimmed: list[str]) -> None:
    import torch

    header = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "dry_run": check.args.dry_run, "seconds": round(check.budget - check.left(), 1),
              "shims": shimmed}  # fmt: skip
    report = {"header": header, **check.results}
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU check ({header['device']}, torch {header['torch']}{', dry run' if check.args.dry_run else ''})",
             "", f"{header['seconds']} s in all; stand-ins for missing modules: {shimmed or 'none'}", ""]  # fmt: skip
    for name, result in check.results.items():
        lines += [f"## {name}: {'ok' if result.get('ok') else 'FAILED'}", "", "```",
                  json.dumps(result, indent=1), "```", ""]  # fmt: skip
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--report", type=Path, default=Path("gpu_check.md"), help="Markdown report (+ .json)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, no compile: the plumbing")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():  # before minutes of subprocesses that would all fail
        parser.exit(2, "gpu_check.py: no CUDA device here: run it on a GPU machine, or --dry-run for the plumbing\n")
    sys.path[:0] = [str(ROOT / "src")]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        shimmed = missing_shims()
        write_shims(Path(tmp) / "shims", shimmed)
        check = Check(args, Path(tmp) / "shims")
        gpu_tests(check)
        throughput(check, compile_model=False)
        if not args.dry_run:
            throughput(check, compile_model=True)
        mfcc_kmeans(check)
        (Path(tmp) / "run").mkdir()
        torchrun_train(check, Path(tmp) / "run")
        write_report(check, args.report, shimmed)
    failed = [name for name, result in check.results.items() if not result.get("ok")]
    print(f"report: {args.report}; {'all ok' if not failed else 'failed: ' + ', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
