"""Benchmark: the pipeline's first stages at 1, 10 and 100 hours of audio (issue 13, "scale, measured").

For each size: a synthetic corpus derived from the demo's audio (bench/scale_corpus.py, under --work, never
committed), a temporary git + DVC repository holding this checkout's dvc.yaml, params.yaml, .dvc/config, stages/ and
src/ (data.train / data.valid pointing at the corpus, train_it1.max_steps = --steps), then `dvc repro --single-item`
of manifest, mfcc, kmeans_it1, units_it1 and pretrain_it1, one after the other. Each stage's command runs under this
script's `--measure` wrapper (the only change to dvc.yaml: a prefix to the five commands), which records the command's
own wall time, CPU time (its processes and their children), peak RSS (`ru_maxrss`: the largest process, file pages
of memory maps included) and peak anonymous RSS (`RssAnon`, sampled every 0.2 s, summed over the stage's processes).
DVC's overhead is the rest of the `dvc repro` (hashing dependencies and outputs, the cache, dvc.lock), and a
`dvc status <stage>` run afterwards (hashes from DVC's state database). Disk written: what the stage added to
outputs/, metrics/ and .dvc/cache, a hard-linked file counted once.

    uv run python bench/bench_scale.py --hours 1 10 100 --threads 1     # figures into docs/ (JSON and tables)
    uv run python bench/bench_scale.py --report-only                    # the tables again, from the JSON

Results are merged into --results by corpus size (a later `--hours 100` keeps the 1 h and 10 h figures); the tables
go into --doc between the markers `<!-- bench_scale:begin -->` and `<!-- bench_scale:end -->`.
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from scale_report import STAGES, render, write_between_markers

REPO = Path(__file__).resolve().parents[1]
OUTPUT_ROOTS = ("outputs", "metrics", ".dvc/cache")
SAMPLE_SECONDS = 0.2
GB = 1e9


def _rss_anon_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("RssAnon:")), 0)


def _tree_anon_kb(pid: int, *, tree: bool) -> int:
    import psutil

    pids = [pid]
    if tree:
        try:
            pids += [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return sum(_rss_anon_kb(p) for p in pids)


def run_measured(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None, tree: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run `argv` (its output appended to `log`, else inherited): wall and CPU seconds (children included), peak RSS
    (`ru_maxrss`, GB) and peak anonymous RSS sampled every SAMPLE_SECONDS (GB; of its descendants too if `tree`)."""
    out = log.open("ab") if log else None
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak_anon[0] = max(peak_anon[0], _tree_anon_kb(proc.pid, tree=tree))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if out is not None:
        out.close()
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,  # user and system (the kernel's reads, writes, page faults) apart
        "sys_s": usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss * 1024 / GB,
        "peak_anon_gb": peak_anon[0] * 1024 / GB,
    }


def measure(out: Path, command: list[str]) -> int:
    """The wrapper dvc.yaml's commands run under: run the stage's command, write its figures to `out`."""
    figures = run_measured(command)
    own = resource.getrusage(resource.RUSAGE_SELF)
    figures["wrapper_cpu_s"] = own.ru_utime + own.ru_stime
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures["returncode"]


def disk_bytes(root: Path) -> int:
    """Bytes allocated under root's OUTPUT_ROOTS, each inode counted once (hard links to the cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for name in OUTPUT_ROOTS:
        for folder, _, files in os.walk(root / name):
            for f in files:
                st = os.lstat(Path(folder) / f)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def stage_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    return env


def sh(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def make_repo(root: Path, corpus: Path, measures: Path, *, steps: int, threads: int, overrides: list[str],
              checksum_jobs: int | None = None) -> None:  # fmt: skip
    """A git + DVC repository with this checkout's pipeline, pointed at `corpus`, its commands measured, the params
    `overrides` (SECTION.KEY=VALUE, the value read as YAML) applied, DVC hashing with `core.checksum_jobs` if given."""
    root.mkdir(parents=True)
    for name in ("params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mlruns").mkdir()
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    wrapper = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} --measure"
    for stage in STAGES:
        cmd = dvc_yaml["stages"][stage]["cmd"]
        dvc_yaml["stages"][stage]["cmd"] = f"{wrapper} {shlex.quote(str(measures / stage))}.json -- {cmd}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False, width=1000))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(train=str(corpus / "train"), valid=str(corpus / "valid"), alignments="")
    params["execution"]["workers"] = threads
    params["kmeans"]["fit_fraction"] = 0.1  # the recipe's (the demo's params.yaml fits on every file)
    params["train_it1"]["max_steps"] = steps
    params["train_it1"]["warmup_steps"] = min(params["train_it1"]["warmup_steps"], steps // 2)  # < max_steps
    for override in overrides:
        key, value = override.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh([dvc(), "init", "-q"], root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    if checksum_jobs:
        sh([dvc(), "config", "--local", "core.checksum_jobs", str(checksum_jobs)], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"], root)


def dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def measure_stage(root: Path, stage: str, measures: Path, env: dict[str, str]) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` and `dvc status <stage>`: the command's figures and DVC's overhead."""
    before = disk_bytes(root)
    load = os.getloadavg()[0]
    repro = run_measured([dvc(), "repro", "--single-item", stage], cwd=root, env=env, log=root / "bench.log",
                         tree=False)  # fmt: skip
    if repro["returncode"]:
        raise RuntimeError(f"dvc repro {stage} failed:\n{(root / 'bench.log').read_text()[-5000:]}")
    command = json.loads((measures / f"{stage}.json").read_text())
    status = run_measured([dvc(), "status", stage], cwd=root, env=env, log=root / "bench.log", tree=False)
    return {
        "command": {k: v for k, v in command.items() if k != "returncode"},
        "dvc_repro": {"wall_s": repro["wall_s"], "cpu_s": repro["cpu_s"], "peak_anon_gb": repro["peak_anon_gb"]},
        "dvc_overhead": {
            "wall_s": repro["wall_s"] - command["wall_s"],
            "cpu_s": repro["cpu_s"] - command["cpu_s"] - command["wrapper_cpu_s"],
        },
        "dvc_status": {"wall_s": status["wall_s"], "cpu_s": status["cpu_s"]},
        "disk_written_gb": (disk_bytes(root) - before) / GB,
        "load_average": [load, os.getloadavg()[0]],
    }


def rehash_corpus(root: Path, corpus: Path, env: dict[str, str], jobs: int) -> dict[str, float]:
    """`dvc status manifest` after every corpus file's modification time changed: DVC hashes the corpus again
    (what its first `dvc repro` did), with `core.checksum_jobs` = `jobs`."""
    now = time.time()
    for path in corpus.rglob("*.wav"):
        os.utime(path, (now, now))
    sh([dvc(), "config", "--local", "core.checksum_jobs", str(jobs)], root)
    status = run_measured([dvc(), "status", "manifest"], cwd=root, env=env, log=root / "bench.log", tree=False)
    return {"wall_s": status["wall_s"], "cpu_s": status["cpu_s"]}


def corpus_figures(root: Path, corpus: Path) -> dict[str, Any]:
    import polars as pl

    figures: dict[str, Any] = {"corpus_gb": sum(p.stat().st_size for p in corpus.rglob("*.wav")) / GB}
    for split in ("train", "valid"):
        manifest = pl.read_csv(root / "outputs" / "manifests" / f"{split}.csv")
        figures[f"{split}_files"] = manifest.height
        figures[f"{split}_hours"] = int(manifest["num_samples"].sum()) / 16_000 / 3600
    return figures


def bench_size(hours: float, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{hours:g}h"
    corpus, root, measures = args.work / f"corpus-{tag}", args.work / f"repo-{tag}", args.work / f"measures-{tag}"
    generation = run_measured([sys.executable, str(REPO / "bench" / "scale_corpus.py"), str(args.source), str(corpus),
                               "--hours", str(hours), "--valid-hours", str(args.valid_hours)])  # fmt: skip
    if generation["returncode"]:
        raise RuntimeError(f"scale_corpus.py failed for {tag}")
    for folder in (root, measures):
        shutil.rmtree(folder, ignore_errors=True)
    make_repo(root, corpus, measures, steps=args.steps, threads=args.threads, overrides=args.set,
              checksum_jobs=args.checksum_jobs)  # fmt: skip
    env = stage_env(args.threads)
    result: dict[str, Any] = {"hours_requested": hours, "threads": args.threads, "steps": args.steps, "stages": {}}
    result["overrides"] = args.set
    result["checksum_jobs"] = args.checksum_jobs
    for stage in STAGES[: args.stages]:
        print(f"{tag}: {stage} ...", flush=True)
        result["stages"][stage] = measure_stage(root, stage, measures, env)
        print(f"{tag}: {stage}: {json.dumps(result['stages'][stage])}", flush=True)
    result |= corpus_figures(root, corpus)
    if args.stages == len(STAGES):  # hashing the corpus again (twice): not for a partial run
        result["rehash_corpus"] = {str(jobs): rehash_corpus(root, corpus, env, jobs) for jobs in (1, 2)}
    result["corpus_generation"] = {"wall_s": generation["wall_s"], "cpu_s": generation["cpu_s"]}
    result["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.keep:
        for folder in (root, measures, corpus):
            shutil.rmtree(folder, ignore_errors=True)
    return result


def save_results(path: Path, new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results |= new
    results = dict(sorted(results.items(), key=lambda kv: float(kv[1]["hours_requested"])))
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    Path(f.name).replace(path)
    return results


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":  # the wrapper: --measure OUT.json -- command ...
        sys.exit(measure(Path(sys.argv[2]), sys.argv[sys.argv.index("--") + 1 :]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="corpus sizes")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and execution.workers")
    parser.add_argument("--steps", type=int, default=200, help="train_it1.max_steps")
    parser.add_argument("--checksum-jobs", type=int, default=None,
                        help="DVC's core.checksum_jobs (default: DVC's, max(1, min(4, cores // 2)))")  # fmt: skip
    parser.add_argument("--valid-hours", type=float, default=0.1, help="the validation split of every corpus")
    parser.add_argument(
        "--source", type=Path, default=REPO / "data/demo/wav/train", help="audio the corpora derive from"
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "scale", help="corpora and repositories"
    )
    parser.add_argument("--keep", action="store_true", help="keep corpora and repositories")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a params override")
    parser.add_argument("--stages", type=int, default=len(STAGES), help=f"run the first N of: {', '.join(STAGES)}")
    parser.add_argument("--results", type=Path, default=REPO / "docs/bench_scale_results.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs/benchmarks.md", help="where the tables go")
    parser.add_argument("--report-only", action="store_true", help="render the tables from --results, run nothing")
    args = parser.parse_args()
    if not args.report_only:
        results = save_results(args.results, {f"{h:g}h": bench_size(h, args) for h in args.hours})
    else:
        results = json.loads(args.results.read_text())
    write_between_markers(args.doc, render(results))
    print(render(results))


if __name__ == "__main__":
    main()
