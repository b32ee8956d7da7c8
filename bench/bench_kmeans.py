"""Benchmark: our k-means (`hubert_pipeline.kmeans.fit_kmeans`) against the reference recipe's sklearn MiniBatchKMeans.

Both fit the SAME frames (every frame of one feature store, fit_fraction=1.0); the reference is
`minimal_hubert.kmeans.build_kmeans(k, seed=...)` (k-means++, batch 10,000, n_init 20, max_iter 100,
max_no_improvement 100, reassignment_ratio 0), its inertia `-kmeans.score(X) / len(X)` as minimal_hubert logs it.
Ours is timed from the store (reading included), the reference from an array already in memory.

    uv run python bench/bench_kmeans.py                       # ~200k frames of 39-d MFCC of synthesized speech
    uv run python bench/bench_kmeans.py --store features/mfcc  # the frames of a real store
    uv run python bench/bench_kmeans.py --frames 50000 --k 100 --keep-store /tmp/mfcc-store  # keep it for reruns

Without --store, speech is synthesized with festival's `text2wave` (voices kal and ked) from English text (the
docstrings of standard-library modules), and turned into kaldi-style MFCC + deltas + delta-deltas (39-d, 100 Hz)
exactly as fairseq's `dump_mfcc_feature.py` does.
"""

import argparse
import contextlib
import functools
import importlib
import os
import pydoc
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hubert_pipeline.kmeans import fit_kmeans, init_sample_size
from hubert_pipeline.params import KmeansParams
from hubert_pipeline.store import FeatureStore, finalize_store, write_shard

VOICES = ("voice_kal_diphone", "voice_ked_diphone")
TEXT_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
    "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "threading", "typing", "unittest",
    "urllib.request", "zipfile",
)  # fmt: skip


def english_paragraphs() -> Iterator[str]:
    """Plain English paragraphs of 80 words (~30 s of speech) from standard-library documentation, always the same."""
    text = []
    for name in TEXT_MODULES:
        doc = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)  # ty: ignore[missing-attribute]  (not in typeshed)
        words = [w for w in doc.split() if w.isascii() and w.strip(".,;:").isalpha()]
        text.extend(words)
    for start in range(0, len(text), 80):
        yield " ".join(text[start : start + 80]) + "."


def synthesize(text: str, voice: str, path: Path) -> np.ndarray:
    subprocess.run(["text2wave", "-o", str(path), "-eval", f"({voice})"], input=text.encode(), check=True)
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getsampwidth()) != (16_000, 2):
            raise ValueError(f"{path}: expected 16 kHz 16-bit audio from text2wave")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def mfcc_39(samples: np.ndarray) -> np.ndarray:
    """fairseq `dump_mfcc_feature.py`: kaldi MFCC (13, no energy) + deltas + delta-deltas, (frames, 39)."""
    import torchaudio

    with torch.inference_mode():
        mfccs = torchaudio.compliance.kaldi.mfcc(
            torch.from_numpy(samples).unsqueeze(0), sample_frequency=16_000, use_energy=False
        ).T  # (13, frames)
        deltas = torchaudio.functional.compute_deltas(mfccs)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        return torch.cat([mfccs, deltas, ddeltas]).T.contiguous().numpy()


def build_speech_store(root: Path, frames: int) -> FeatureStore:
    """A store of >= `frames` MFCC frames of synthesized speech, one file per paragraph, alternating voices."""
    wavs = root / "wav"
    wavs.mkdir(parents=True, exist_ok=True)
    features: list[tuple[str, np.ndarray]] = []
    paragraphs = enumerate(english_paragraphs())
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        while sum(len(f) for _, f in features) < frames:
            batch = [next(paragraphs, None) for _ in range(8)]
            batch = [b for b in batch if b is not None]
            if not batch:
                raise SystemExit(f"only {sum(len(f) for _, f in features)} frames of text available; lower --frames")
            jobs = [(i, text, VOICES[i % len(VOICES)]) for i, text in batch]
            audio = pool.map(lambda job: synthesize(job[1], job[2], wavs / f"{job[0]:05d}.wav"), jobs)
            features.extend((f"utt{i:05d}", mfcc_39(samples)) for (i, _, _), samples in zip(jobs, audio, strict=True))
            print(f"\rsynthesized {sum(len(f) for _, f in features)} / {frames} frames", end="", file=sys.stderr)
    print(f" in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    shutil.rmtree(wavs)
    store = root / "store"
    write_shard(store, 0, features, dtype="float32", dim=39)
    finalize_store(store, num_shards=1, dim=39, dtype="float32", frame_rate=100.0)
    return FeatureStore(store)


def timed[T](fit: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, CPU seconds of this process over all threads, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fit()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def reference_fit(frames: np.ndarray, k: int, seed: int, **overrides: int) -> float:
    """Fit the reference recipe's k-means on `frames`; return its inertia as minimal_hubert computes it."""
    from minimal_hubert.kmeans import build_kmeans

    kmeans = build_kmeans(k, seed=seed)
    kmeans.set_params(verbose=0, **overrides)  # its per-batch prints are not part of the algorithm
    kmeans.fit(frames)
    return -kmeans.score(frames) / len(frames)


def main() -> None:
    defaults = KmeansParams()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--store", type=Path, help="fit the frames of this feature store instead of synthesized speech")
    parser.add_argument("--frames", type=int, default=200_000, help="frames of synthesized speech (without --store)")
    parser.add_argument(
        "--keep-store", type=Path, help="build the synthesized store here and keep it (reused if there)"
    )
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=int, default=defaults.n_init, help="ours (params.yaml kmeans.n_init)")
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter, help="ours (params.yaml kmeans.max_iter)")
    parser.add_argument("--tol", type=float, default=defaults.tol, help="ours (params.yaml kmeans.tol)")
    parser.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames, help="ours")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (interleaved); the best is kept")
    parser.add_argument("--device", default="cpu", help="ours: 'cpu', 'cuda' or 'auto' (the reference is CPU only)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.store is not None:
            store = FeatureStore(args.store)
        elif args.keep_store is not None and (args.keep_store / "store" / "meta.json").is_file():
            store = FeatureStore(args.keep_store / "store")
        else:
            root = args.keep_store or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kmeans-")))
            store = build_speech_store(root, args.frames)
        frames = np.concatenate(list(store.iter_chunks(chunk_frames=args.chunk_frames)))
        print(f"frames: {len(frames)} x {frames.shape[1]} from {len(store)} files of {store.root}; k={args.k}")
        print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}, device (ours): {args.device}")

        ours_fit = functools.partial(
            fit_kmeans,
            store,
            k=args.k,
            fit_fraction=1.0,
            seed=args.seed,
            max_iter=args.max_iter,
            tol=args.tol,
            n_init=args.n_init,
            chunk_frames=args.chunk_frames,
            device=args.device,
        )
        reference = functools.partial(reference_fit, frames, args.k, args.seed)
        ours_fit(max_iter=1, n_init=1)  # warm-ups: first-call overheads of torch, of sklearn (threadpoolctl), ...
        reference_fit(frames[: 100 * args.k], args.k, args.seed, n_init=1, max_iter=3)
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "reference": []}
        for repeat in range(args.repeats):  # interleaved, so that a busy spell of the machine hits both
            ours_wall, ours_cpu, ours = timed(ours_fit)
            ref_wall, ref_cpu, ref_inertia = timed(reference)
            runs["ours"].append((ours_wall, ours_cpu))
            runs["reference"].append((ref_wall, ref_cpu))
            print(f"run {repeat + 1}: ours {ours_wall:.2f} s, reference {ref_wall:.2f} s", file=sys.stderr)

    ours_s, ours_cpu = (min(times) for times in zip(*runs["ours"], strict=True))
    ref_s, ref_cpu = (min(times) for times in zip(*runs["reference"], strict=True))
    print(
        f"ours: n_init={args.n_init} max_iter={args.max_iter} tol={args.tol} init sample {init_sample_size(args.k)}"
        f" -> {ours.n_iter} Lloyd iterations on the whole set"
    )
    print(f"best of {args.repeats} runs; load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'':10} {'wall (s)':>9} {'CPU (s)':>9} {'inertia':>12}")
    print(f"{'ours':10} {ours_s:9.2f} {ours_cpu:9.2f} {ours.inertia:12.5f}")
    print(f"{'reference':10} {ref_s:9.2f} {ref_cpu:9.2f} {ref_inertia:12.5f}")
    print(f"speed-up (reference time / ours): {ref_s / ours_s:.2f}x wall, {ref_cpu / ours_cpu:.2f}x CPU")
    print(f"inertia ratio (ours / reference): {ours.inertia / ref_inertia:.4f}")


if __name__ == "__main__":
    main()
