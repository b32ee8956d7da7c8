"""Benchmark: what caching a large stage output costs under DVC's cache link types (time and disk).

A temporary git + DVC repository per `cache.type`, one stage whose output is a sharded store of random bytes
(`--gb` GB in `--shards` files, made once and copied in by the stage). `dvc repro --no-commit` runs the stage and
hashes the store; `dvc commit` then moves it into the cache, timed alone. Disk: the store and the cache together,
a file linked twice counted once (`du -sc`). The reference is DVC's default (`reflink,copy`: a copy on ext4).

    uv run python bench/bench_dvc_cache.py                         # 3 GB, the three link choices
    uv run python bench/bench_dvc_cache.py --gb 5 --dir /scratch   # the file system of your cache
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHOICES = ("", "reflink,hardlink,symlink", "hardlink,symlink")  # "": DVC's default (reflink,copy)
DVC_YAML = "stages:\n  store:\n    cmd: cp -r {source} store\n    outs:\n      - store\n"
CHUNK = 64 << 20


def make_source(folder: Path, gb: float, shards: int) -> None:
    folder.mkdir(parents=True)
    per_shard = int(gb * (1 << 30)) // shards
    for shard in range(shards):
        with (folder / f"shard_{shard:03d}.npy").open("wb") as f:
            for start in range(0, per_shard, CHUNK):
                f.write(os.urandom(min(CHUNK, per_shard - start)))


def sh(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def disk_gb(root: Path) -> float:
    """GB of the store and the cache together, hard links counted once."""
    out = sh(["du", "-scB1", "store", ".dvc/cache"], root)
    return int(out.splitlines()[-1].split()[0]) / (1 << 30)


def measure(dvc: str, source: Path, work: Path, cache_type: str) -> tuple[float, float, int]:
    """(seconds of `dvc commit`, GB on disk, link count of a store file) under `cache_type`."""
    root = work / (cache_type.replace(",", "-") or "default")
    root.mkdir()
    sh(["git", "init", "-q"], root)
    sh([dvc, "init", "-q"], root)
    if cache_type:
        sh([dvc, "config", "cache.type", cache_type], root)
    (root / "dvc.yaml").write_text(DVC_YAML.format(source=source))
    sh([dvc, "repro", "--no-commit"], root)
    start = time.perf_counter()
    sh([dvc, "commit", "-f"], root)
    seconds = time.perf_counter() - start
    links = (root / "store" / "shard_000.npy").stat().st_nlink
    gb = disk_gb(root)
    shutil.rmtree(root)
    return seconds, gb, links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--gb", type=float, default=3.0, help="size of the store")
    parser.add_argument("--shards", type=int, default=8, help="files of the store")
    parser.add_argument("--dir", type=Path, default=None, help="where the repositories go (the cache's file system)")
    args = parser.parse_args()
    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        make_source(work / "source", args.gb, args.shards)
        print(f"store of {args.gb:g} GB in {args.shards} files; load average {os.getloadavg()[0]:.1f}")
        results = {choice: measure(dvc, work / "source", work, choice) for choice in CHOICES}
    reference = results[""][0]
    for choice, (seconds, gb, links) in results.items():
        name = choice or "default (reflink,copy)"
        print(f"cache.type {name:26s} dvc commit {seconds:6.1f} s ({reference / seconds:4.1f}x the default), "
              f"store + cache {gb:5.2f} GB, links per file {links}")  # fmt: skip


if __name__ == "__main__":
    main()
