"""Benchmark: a second `dvc repro` on a finished pipeline is a no-op, and how long it takes (goal: <= 3 s).

Run it in a project where the pipeline has run (after `bash run.sh demo`, the repository itself). Every run must
report that nothing changed and run no stage; the wall time of each is printed, the whole command included
(`dvc repro` with no target: DVC hashes every dependency and output of every stage to decide that nothing changed).

    uv run python bench/bench_noop_repro.py                       # the repository's own pipeline
    uv run python bench/bench_noop_repro.py --project /path/to/clone --repeats 10
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

GOAL_SECONDS = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="a DVC project whose pipeline has run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of `dvc repro`")
    args = parser.parse_args()
    if not (args.project / "dvc.lock").is_file():
        sys.exit(f"{args.project}: no dvc.lock; run the pipeline first (bash run.sh demo)")
    # the project's own environment (run.sh installs it with compiled bytecode), else this one's, else PATH's
    dvc = next((str(p) for p in (args.project / ".venv/bin/dvc", Path(sys.executable).parent / "dvc") if p.is_file()),
               shutil.which("dvc"))  # fmt: skip
    if dvc is None:
        sys.exit("dvc is not installed in this environment")
    stages = len(yaml.safe_load((args.project / "dvc.yaml").read_text())["stages"])
    print(f"{args.project}: {stages} stages, {dvc}, load average {os.getloadavg()[0]:.1f}")
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        run = subprocess.run([dvc, "repro"], cwd=args.project, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if run.returncode != 0 or "Running stage" in run.stdout or "up to date" not in run.stdout:
            sys.exit(f"run {i + 1} was not a no-op (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        print(f"run {i + 1}: {times[-1]:.2f} s, nothing to do")
    best, median = min(times), statistics.median(times)
    verdict = "met" if median <= GOAL_SECONDS else "NOT met"
    print(f"no-op dvc repro: best {best:.2f} s, median {median:.2f} s, worst {max(times):.2f} s; "
          f"goal <= {GOAL_SECONDS:.0f} s: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
