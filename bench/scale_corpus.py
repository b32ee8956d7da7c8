"""A synthetic corpus of N hours in LibriSpeech's layout, derived on the fly from the demo's audio (never committed).

Every file is a few source files played back at a random speed (resampled: tempo and pitch change together, as a tape
would), each with its own factor, cut to a length drawn from 10-15 s (LibriSpeech's files average 12.3 s), at a
random level, with white noise 25-45 dB under the speech. Written as 16-bit 16 kHz mono WAV:

    <out>/train/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.wav    (100 files a chapter, 2 chapters a speaker)
    <out>/valid/...                                                   (a fixed, small split: --valid-hours)

Deterministic: file k of a split depends only on (seed, split, k) and the source files, so a rerun skips the files
already written (a killed run resumes) and a larger corpus starts with the files of a smaller one of the same seed.

    uv run python bench/scale_corpus.py data/demo/wav/train /tmp/scale/corpus-10h --hours 10
    uv run python bench/scale_corpus.py data/demo/wav/train /tmp/scale/corpus-100h --hours 100 --workers 2
"""

import argparse
import json
import math
import multiprocessing
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from hubert_pipeline.audio import load_audio
from hubert_pipeline.io import atomic_path, write_json
from hubert_pipeline.manifest import discover_all

SAMPLE_RATE = 16_000
FILES_PER_CHAPTER = 100
CHAPTERS_PER_SPEAKER = 2
SPLITS = {"train": (100, 0), "valid": (9000, 1)}  # first speaker id, seed offset: the splits never share an id
SPEED = (0.85, 1.15)  # playback speed factors
SECONDS = (10.0, 15.0)  # file lengths
SNR_DB = (25.0, 45.0)

_sources: list[np.ndarray] = []  # the source audio, loaded once per process (inherited by forked workers)


def file_lengths(hours: float, seed: int) -> list[int]:
    """Samples of every file of a split of `hours`: drawn until they add up to at least that much audio."""
    rng = np.random.default_rng([seed, 0])
    lengths: list[int] = []
    total, target = 0, hours * 3600 * SAMPLE_RATE
    while total < target:
        lengths.append(int(rng.uniform(*SECONDS) * SAMPLE_RATE))
        total += lengths[-1]
    return lengths


def relative_path(first_speaker: int, k: int) -> Path:
    """LibriSpeech's layout for file k: speaker/chapter/speaker-chapter-NNNN.wav."""
    chapter = k // FILES_PER_CHAPTER
    speaker = first_speaker + chapter // CHAPTERS_PER_SPEAKER
    fileid = f"{speaker}-{1000 + chapter}-{k % FILES_PER_CHAPTER:04d}"
    return Path(str(speaker), str(1000 + chapter), f"{fileid}.wav")


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """`x` played back `factor` times faster (linear interpolation): shorter and higher for factor > 1."""
    positions = np.arange(0, len(x) - 1, factor, dtype=np.float64)
    return np.interp(positions, np.arange(len(x)), x).astype(np.float32)


def synthesize(seed: int, k: int, length: int) -> np.ndarray:
    """The int16 samples of file k (of a split seeded by `seed`): `length` samples."""
    rng = np.random.default_rng([seed, 1, k])
    pieces, have = [], 0
    source = int(rng.integers(len(_sources)))
    while have < length:
        pieces.append(speed(_sources[source], rng.uniform(*SPEED)))
        have += len(pieces[-1])
        source = (source + 1) % len(_sources)
    x = np.concatenate(pieces)[:length]
    x *= 0.9 / max(float(np.max(np.abs(x))), 1e-9) * 10 ** (-rng.uniform(0, 6) / 20)
    noise_rms = math.sqrt(float(np.mean(x**2)) * 10 ** (-rng.uniform(*SNR_DB) / 10))
    x += noise_rms * rng.standard_normal(length, dtype=np.float32)
    return np.clip(np.round(x * 32768), -32768, 32767).astype("<i2")


def write_wav(path: Path, samples: np.ndarray) -> None:
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.tobytes())


def write_files(folder: str, first_speaker: int, seed: int, jobs: list[tuple[int, int]]) -> int:
    """Write files (k, length) not yet there (complete: the size of a WAV of that length); return how many."""
    written = 0
    for k, length in jobs:
        path = Path(folder) / relative_path(first_speaker, k)
        if path.is_file() and path.stat().st_size == 44 + 2 * length:
            continue
        write_wav(path, synthesize(seed, k, length))
        written += 1
    return written


def load_sources(folder: str | Path) -> None:
    _sources[:] = [load_audio(source).numpy() for _, source in discover_all(folder, ".wav")]


def make_split(out: Path, split: str, hours: float, seed: int, workers: int) -> dict:
    first_speaker, offset = SPLITS[split]
    lengths = file_lengths(hours, seed + offset)
    jobs = list(enumerate(lengths))
    chunks = [jobs[i : i + FILES_PER_CHAPTER] for i in range(0, len(jobs), FILES_PER_CHAPTER)]
    args = [(str(out / split), first_speaker, seed + offset, chunk) for chunk in chunks]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:  # sources inherited
            written = sum(pool.map(write_files, *zip(*args, strict=True)))
    else:
        written = sum(write_files(*a) for a in args)
    return {"files": len(lengths), "hours": sum(lengths) / SAMPLE_RATE / 3600, "written": written}


def make_corpus(source: str | Path, out: str | Path, *, hours: float, valid_hours: float, seed: int,
                workers: int = 1) -> dict:  # fmt: skip
    """Write (or complete) the corpus; return its summary, also written to <out>/corpus.json."""
    out = Path(out)
    load_sources(source)
    summary = {"source": str(source), "seed": seed, "sources": len(_sources)}
    for split, split_hours in (("train", hours), ("valid", valid_hours)):
        summary[split] = make_split(out, split, split_hours, seed, workers)
    write_json(out / "corpus.json", summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("source", help="folder of 16 kHz WAV files to derive the corpus from (the demo's train split)")
    parser.add_argument("out", help="folder for train/, valid/ and corpus.json")
    parser.add_argument("--hours", type=float, required=True, help="training audio")
    parser.add_argument("--valid-hours", type=float, default=0.1, help="validation audio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes writing files")
    args = parser.parse_args()
    summary = make_corpus(args.source, args.out, hours=args.hours, valid_hours=args.valid_hours, seed=args.seed,
                          workers=args.workers)  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
