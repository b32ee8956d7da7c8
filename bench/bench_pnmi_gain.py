"""Benchmark: the jackknife of PNMI gains (`hubert_pipeline.unit_metrics.pnmi_gain`) against recounting.

`pnmi_gain` computes two unit systems' PNMI without each evaluation file in turn by subtracting that file's
(phone, unit) counts from the total (`_FileCounts.without`). The obvious way, which this replaces, recounts: the
production `joint_counts` over every file but one, for each file. Both run here on the SAME synthetic split, sized
like LibriSpeech dev-clean by default (2,700 files of 7 s: 1.9 M phone frames at 100 Hz; 40 phones, 500 units):

    uv run python bench/bench_pnmi_gain.py                               # dev-clean-sized split
    uv run python bench/bench_pnmi_gain.py --files 31 --seconds 7.7 --recount 31  # the demo's valid split

The recount is timed on `--recount` files (default 20) and scaled to all of them (each deletion costs the same:
one count over n - 1 files); for two of them the recounted difference is checked equal (to 1e-12) to
`pnmi_gain`'s plug-in difference over the same n - 1 files. Units are a noisy function of the phone (a unit
system that carries some phone information, as real ones do), phones are runs of 3-15 frames.
"""

import argparse
import time

import numpy as np

from hubert_pipeline.unit_metrics import joint_counts, pnmi_gain, quality_from_counts

NUM_PHONES, NUM_UNITS = 40, 500


def synthetic_split(
    files: int, seconds: float, seed: int
) -> tuple[dict[str, list[list]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Alignments and two unit systems (50 Hz): units drawn near each phone's own units, the second noisier."""
    rng = np.random.default_rng(seed)
    alignments, a, b = {}, {}, {}
    for i in range(files):
        fid = f"f{i:05d}"
        lengths = rng.integers(3, 16, size=int(seconds * 100 / 9) + 1)
        onsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) / 100
        labels = rng.integers(0, NUM_PHONES, size=len(lengths))
        spans = zip(onsets, lengths, labels, strict=True)
        alignments[fid] = [[float(t), float(t + n / 100), f"p{y}"] for t, n, y in spans]
        frames = np.repeat(labels, lengths)[: int(seconds * 100) // 2 * 2 : 2]  # the phone at each 50 Hz frame
        for units, noise in ((a, 0.3), (b, 0.5)):
            own = frames * (NUM_UNITS // NUM_PHONES) + rng.integers(0, NUM_UNITS // NUM_PHONES, size=len(frames))
            units[fid] = np.where(rng.random(len(frames)) < noise, rng.integers(0, NUM_UNITS, len(frames)), own)
    return alignments, a, b


def recount_without(units: dict[str, np.ndarray], alignments: dict[str, list[list]], fid: str) -> float:
    """PNMI of `units` over every file but `fid`, counted afresh by the production `joint_counts`."""
    rest = {f: u for f, u in units.items() if f != fid}
    return quality_from_counts(joint_counts(rest, alignments, unit_rate=50.0)[0])["pnmi"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2700)
    parser.add_argument("--seconds", type=float, default=7.0, help="seconds per file")
    parser.add_argument("--recount", type=int, default=20, help="deletions timed for the recount")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    alignments, a, b = synthetic_split(args.files, args.seconds, args.seed)
    frames = sum(len(u) for u in a.values()) * 2
    start = time.perf_counter()
    gain = pnmi_gain(a, b, alignments)
    ours = time.perf_counter() - start
    sample = sorted(a)[: args.recount]
    start = time.perf_counter()
    recounted = [recount_without(a, alignments, f) - recount_without(b, alignments, f) for f in sample]
    recount = (time.perf_counter() - start) / len(sample) * len(a)
    rebuilt = [pnmi_gain({f: u for f, u in a.items() if f != fid}, b, alignments)["plug_in"] for fid in sample[:2]]
    np.testing.assert_allclose(rebuilt, recounted[:2], rtol=0, atol=1e-12)
    print(f"{args.files} files, {frames:,} phone frames, {NUM_PHONES} phones x {NUM_UNITS} units")
    print(f"gain {gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}], plug-in {gain['plug_in']:+.4f}")
    print(f"pnmi_gain (counts subtracted per file): {ours:.2f} s")
    print(f"recount per deletion (joint_counts x 2, {len(sample)} timed, scaled to {len(a)}): {recount:.1f} s")
    print(f"ratio: {recount / ours:.0f}x")


if __name__ == "__main__":
    main()
