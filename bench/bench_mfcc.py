"""Benchmark: our MFCC stage (`hubert_pipeline.features.extract_mfcc`) against the reference recipe's.

Both read the SAME audio files. The reference is `minimal_hubert.features.compute_and_save_mfccs`: file by file,
decode, `mfcc` (torchaudio's kaldi MFCC + deltas + delta-deltas) and `torch.save` of one .pt per file, in one
process, run with torch's default threads and with 1 thread (ratios are against the faster: on a loaded machine,
torch's 2 OpenMP threads can be many times slower than 1). Ours writes a sharded store with the stage's default
(workers=2: two threads, 1 torch thread each) and with workers=1 (inline, torch's default threads). Every file's
features are checked equal (assert_close) to the reference's. The pure compute is timed too (reference `mfcc` file
by file vs our `mfcc_batch` on 60 s batches, audio already in memory), so that the speedup can be traced to its
source.

    uv run python bench/bench_mfcc.py                        # 10 minutes of speech, each file listed 6 times (1 hour)
    uv run python bench/bench_mfcc.py --minutes 30 --copies 4  # 30 minutes, each file listed 4 times (2 hours)
    uv run python bench/bench_mfcc.py --manifest outputs/manifests/train.csv --copies 1  # a real manifest as it is

Without --manifest, speech is synthesized with festival's `text2wave` (voices kal and ked) from the GPL-3 text in
/usr/share/common-licenses, cut into utterances of 5 to 15 s. `--copies N` lists every file N times under new file
ids (symbolic links): the reference takes about 0.3 s for 10 minutes, which would time fixed costs (reading the
manifest, opening and sealing shards) more than the work itself.
"""

import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hubert_pipeline.audio import load_audio, source_of
from hubert_pipeline.features import extract_mfcc, mfcc_batch
from hubert_pipeline.manifest import build_manifest, read_manifest, write_csv
from hubert_pipeline.params import ExecutionParams, MfccParams
from hubert_pipeline.store import FeatureStore

VOICES = ("voice_kal_diphone", "voice_ked_diphone")
TEXT = Path("/usr/share/common-licenses/GPL-3")
SAMPLE_RATE = 16_000


def _paragraphs(text: str, chars: int) -> list[str]:
    """Pieces of about `chars` characters, cut at word boundaries."""
    pieces, current = [], ""
    for word in text.split():
        current += word + " "
        if len(current) >= chars:
            pieces.append(current)
            current = ""
    return [*pieces, current] if current.strip() else pieces


def _text2wave(text: str, voice: str, path: Path) -> np.ndarray:
    subprocess.run(["text2wave", "-o", str(path), "-eval", f"({voice})"], input=text.encode(), check=True)
    with wave.open(str(path)) as w:
        assert w.getframerate() == SAMPLE_RATE
        assert w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.astype("<i2").tobytes())


def synthesize(folder: Path, minutes: float, seed: int = 0) -> None:
    """At least `minutes` of speech as utterances of 5 to 15 s, in `folder`."""
    rng = random.Random(seed)
    paragraphs = _paragraphs(TEXT.read_text(encoding="utf-8"), 900)  # about 60 s of speech each
    needed = int(minutes * 60 * SAMPLE_RATE)
    raw = folder / "raw"
    raw.mkdir(parents=True)
    jobs = [(p, VOICES[i % len(VOICES)], raw / f"{i:04d}.wav") for i, p in enumerate(paragraphs)]
    total, index, cycle = 0, 0, 0
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        while total < needed:  # cycle through the text as often as needed, a few paragraphs at a time
            for i in range(0, len(jobs), workers):
                for speech in pool.map(lambda job: _text2wave(*job), jobs[i : i + workers]):
                    offset = rng.randrange(SAMPLE_RATE) if cycle else 0  # later cycles cut elsewhere
                    while offset + 5 * SAMPLE_RATE <= len(speech) and total < needed:
                        length = min(rng.randrange(5 * SAMPLE_RATE, 15 * SAMPLE_RATE), len(speech) - offset)
                        _write_wav(folder / f"utt{index:05d}.wav", speech[offset : offset + length])
                        total, index, offset = total + length, index + 1, offset + length
                if total >= needed:
                    break
            cycle += 1
    shutil.rmtree(raw)


def copies_of(manifest: Path, copies: int, folder: Path) -> Path:
    """A manifest listing every file `copies` times under new file ids (symbolic links in `folder`)."""
    import polars as pl

    df = read_manifest(manifest)
    if copies == 1:
        return manifest
    folder.mkdir(parents=True)
    rows = []
    for copy in range(copies):
        for row in df.iter_rows(named=True):
            path = folder / f"c{copy}-{row['fileid']}.wav"
            path.symlink_to(Path(row["path"]).resolve())
            rows.append({**row, "fileid": path.stem, "path": str(path)})
    out = folder / "manifest.csv"
    write_csv(pl.DataFrame(rows, schema=df.schema), out)
    return out


@dataclass
class Timing:
    """Best wall time and best CPU time (of the processes doing the work) over repeated runs, in seconds."""

    wall: float = float("inf")
    cpu: float = float("inf")

    def add(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = min(self.wall, wall), min(self.cpu, cpu)


def timed(fn: Callable[[], Any], before: Callable[[], Any] = lambda: None) -> tuple[float, float]:
    """(wall, CPU time of this process) of fn() (before() runs untimed first)."""
    before()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _with_threads(threads: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(default)

    return run


def end_to_end(manifest: Path, tmp: Path, *, repeats: int, num_shards: int) -> dict[str, Timing]:
    """Best times of each way to turn the manifest into features, the runs of each interleaved."""
    from minimal_hubert.features import compute_and_save_mfccs

    params = MfccParams(num_shards=num_shards)
    runs: dict[str, Callable[[], Any]] = {
        "ref": lambda: compute_and_save_mfccs(manifest, tmp / "ref"),
        "ref-1": _with_threads(1, lambda: compute_and_save_mfccs(manifest, tmp / "ref-1")),
        **{
            f"ours-w{w}": lambda w=w: extract_mfcc(
                manifest, tmp / f"ours-w{w}", params=params, execution=ExecutionParams(workers=w, device="cpu")
            )
            for w in (2, 1)
        },
    }
    best = {name: Timing() for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name].add(*timed(run, lambda d=tmp / name: shutil.rmtree(d, ignore_errors=True)))
    return best


def check_equal(manifest: Path, tmp: Path) -> float:
    """assert_close of every file's features in both stores with the reference's .pt; the largest difference."""
    df = read_manifest(manifest)
    root = Path(os.path.commonpath(df["path"].to_list()))
    worst = 0.0
    for workers in (2, 1):
        store = FeatureStore(tmp / f"ours-w{workers}")
        assert len(store) == df.height
        for row in df.iter_rows(named=True):
            ref = torch.load(tmp / "ref" / Path(row["path"]).relative_to(root).with_suffix(".pt"))
            ours = torch.from_numpy(np.array(store.get(row["fileid"])))
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)
            worst = max(worst, (ours - ref).abs().max().item())
    return worst


def pure_compute(manifest: Path, *, repeats: int) -> dict[str, Timing]:
    """Best times of the reference `mfcc` file by file and of our `mfcc_batch` on 60 s batches, audio in memory;
    ours also as the stage runs it with 2 workers: 2 threads taking batches, 1 torch thread each."""
    from minimal_hubert.features import mfcc as ref_mfcc

    waveforms = [load_audio(source_of(row)) for row in read_manifest(manifest).iter_rows(named=True)]
    batches: list[list[torch.Tensor]] = [[]]
    for w in waveforms:
        if sum(x.shape[0] for x in batches[-1]) >= 60 * SAMPLE_RATE:
            batches.append([])
        batches[-1].append(w)
    best: dict[str, Timing] = {}
    runs: list[tuple[str, int, Callable[[], Any]]] = []
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        runs.append((f"reference, {threads} thread(s)", threads, lambda: [ref_mfcc(w[None]) for w in waveforms]))
        runs.append((f"ours, {threads} thread(s)", threads, lambda: [mfcc_batch(b) for b in batches]))
    with ThreadPoolExecutor(2) as pool:
        runs.append(("ours, 2 workers (threads) x 1 thread", 1, lambda: list(pool.map(mfcc_batch, batches))))
        for name, threads, run in runs:
            timing = best.setdefault(name, Timing())
            for _ in range(repeats):
                timing.add(*timed(_with_threads(threads, run)))
    best["ours, 2 workers (threads) x 1 thread"].cpu = float("nan")  # the pool's threads' CPU time is not seen
    return best


def kernel_startup() -> float:
    """Seconds a fresh process spends on our first MFCC beyond importing torch: importing numba and loading the
    compiled kernels from numba's cache (one run before, so that the cache exists)."""
    code = (
        "import time, numpy as np, torch; t = time.perf_counter(); from hubert_pipeline.features import mfcc_batch; "
        "mfcc_batch([np.zeros(16000, np.int16)]); print(time.perf_counter() - t)"
    )
    run = lambda: float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)  # noqa: E731
    run()
    return min(run() for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--manifest", help="manifest CSV of the audio to use; default: synthesize speech")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of speech to synthesize")
    parser.add_argument("--copies", type=int, default=6, help="list every file this many times (symbolic links)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (best is kept)")
    parser.add_argument("--num-shards", type=int, default=MfccParams().num_shards, help="shards of our store")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-mfcc-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.manifest:
            manifest = Path(args.manifest)
        else:
            start = time.perf_counter()
            synthesize(tmp / "wav", args.minutes)
            manifest = tmp / "manifest.csv"
            write_csv(build_manifest(tmp / "wav")[0], manifest)
            print(f"synthesized {args.minutes} min of speech in {time.perf_counter() - start:.1f} s")
        manifest = copies_of(manifest, args.copies, tmp / "copies")
        df = read_manifest(manifest)
        audio_seconds = int(df["num_samples"].sum()) / SAMPLE_RATE
        print(f"{df.height} files, {audio_seconds / 60:.1f} min of audio, each file listed {args.copies} time(s)")
        t = end_to_end(manifest, tmp, repeats=args.repeats, num_shards=args.num_shards)
        worst = check_equal(manifest, tmp)
        print(f"outputs equal (assert_close) for all {df.height} files in both stores, largest difference {worst:.2g}")
        compute = pure_compute(manifest, repeats=args.repeats)
        startup = kernel_startup()

    def row(label: str, timing: Timing, base: Timing | None = None) -> None:
        line = f"{label:<55} {audio_seconds / timing.wall:7.0f} s/s {timing.wall:7.2f} s {timing.cpu:7.2f} s"
        if base is not None:
            line += f"   x{base.wall / timing.wall:4.1f}"
            line += f"   x{base.cpu / timing.cpu:4.1f}" if math.isfinite(timing.cpu) else ""
        print(line)

    threads = torch.get_num_threads()
    base = Timing(min(t["ref"].wall, t["ref-1"].wall), min(t["ref"].cpu, t["ref-1"].cpu))
    print(f"\n{audio_seconds / 60:.1f} min of audio, best of {args.repeats} runs; ratios to the reference at its best")
    print(f"{'':<55} {'audio/wall':>11} {'wall':>9} {'CPU':>9} {'wall':>7} {'CPU':>7}")
    row(f"reference, file by file, {threads} threads (torch's default)", t["ref"])
    row("reference, file by file, 1 thread", t["ref-1"])
    row("ours, extract_mfcc workers=2 (the stage's default: threads)", t["ours-w2"], base)
    row(f"ours, extract_mfcc workers=1 (inline, {threads} threads)", t["ours-w1"], base)
    print("pure compute, audio in memory (reference mfcc per file, ours mfcc_batch on 60 s batches):")
    base = Timing(
        min(c.wall for k, c in compute.items() if k.startswith("reference")),
        min(c.cpu for k, c in compute.items() if k.startswith("reference")),
    )
    for name, timing in compute.items():
        row(f"  {name}", timing, None if name.startswith("reference") else base)
    print(f"once per process, not in the runs above: {startup:.2f} s to import numba and load our compiled kernels")


if __name__ == "__main__":
    main()
