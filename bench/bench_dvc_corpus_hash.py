"""Benchmark: what DVC spends hashing a corpus that a stage depends on, as a folder or as a fairseq listing (.tsv).

A stage that depends on a corpus folder makes DVC read every byte of it (md5) the first time it checks the stage in
a repository folder: after a clone, and again in each `dvc exp run --queue` / `--temp` copy (DVC's hash cache is
kept per repository folder). A stage that depends on a listing (`data.train: train.tsv`, hubert_pipeline.manifest's
`listed`) makes DVC hash the listing only. Each case runs in a new temporary git + DVC repository (a cold DVC hash
cache, as in a queued experiment), once with the cache cold and once more warm; the corpus is read once before the
timings, so the page cache is warm in both: a cold disk only makes the folder case slower.

    uv run python bench/bench_dvc_corpus_hash.py --corpus /tmp/scale/corpus-100h/train
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from hubert_pipeline.manifest import discover_all

DVC_YAML = "stages:\n  manifest:\n    cmd: echo done > out.txt\n    deps:\n      - {dep}\n    outs:\n      - out.txt\n"


def write_listing(corpus: Path, path: Path, extension: str) -> int:
    """fairseq's manifest of the corpus: its folder, then one relative path per line; the number of files."""
    files = [Path(source.path).relative_to(corpus.resolve()) for _, source in discover_all(corpus, extension)]
    path.write_text(f"{corpus.resolve()}\n" + "".join(f"{f}\n" for f in files))
    return len(files)


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(dep: Path, repos: Path, name: str) -> dict[str, float]:
    """`dvc repro` (first check: DVC hashes the dep) then `dvc status` (from DVC's hash cache), in a new repo."""
    repo = repos / name
    repo.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML.format(dep=dep))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True)
    return {"first_repro_s": timed(["dvc", "repro", "-q"], repo), "status_s": timed(["dvc", "status", "-q"], repo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus folder (e.g. bench/scale_corpus.py's)")
    parser.add_argument("--extension", default=".wav")
    args = parser.parse_args()
    size = sum(p.stat().st_size for p in args.corpus.rglob("*") if p.is_file())
    subprocess.run(["cat", *map(str, args.corpus.rglob(f"*{args.extension}"))], stdout=subprocess.DEVNULL, check=True)
    with tempfile.TemporaryDirectory(prefix="dvc-corpus-hash-") as tmp:
        listing = Path(tmp) / "train.tsv"
        files = write_listing(args.corpus, listing, args.extension)
        (Path(tmp) / "repos").mkdir()
        folder = measure(args.corpus.resolve(), Path(tmp) / "repos", "folder")
        tsv = measure(listing, Path(tmp) / "repos", "listing")
    print(f"corpus {args.corpus}: {files} files, {size / 1e9:.2f} GB")
    print("| DVC dependency | first `dvc repro` (cold DVC hash cache) s | `dvc status` after s |")
    print("| --- | --- | --- |")
    for name, row in (("the corpus folder", folder), (f"its listing ({listing.name})", tsv)):
        print(f"| {name} | {row['first_repro_s']:.1f} | {row['status_s']:.1f} |")


if __name__ == "__main__":
    main()
