"""Unit quality against phone alignments (HuBERT paper §IV-E, fairseq `measure_teacher_quality.py`).

With joint frame counts of phone y and unit z (units upsampled to the 100 Hz phone frame rate):
phone purity = E_z[max_y p(y|z)], cluster purity = E_y[max_z p(z|y)], PNMI = I(y;z) / H(y).
Alignments are JSONL lines `{"fileid", "phones": [[onset_s, offset_s, phone], ...]}` (the demo corpus writes them).
"""

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

PHONE_FRAME_RATE = 100.0


def frame_labels(phones: list[list], num_frames: int, frame_rate: float = PHONE_FRAME_RATE) -> list[str]:
    """Phone at the centre of each frame; frames past the last phone take the last phone."""
    onsets = np.asarray([p[0] for p in phones], dtype=np.float64)
    centres = (np.arange(num_frames) + 0.5) / frame_rate
    idx = np.clip(np.searchsorted(onsets, centres, side="right") - 1, 0, len(phones) - 1)
    return [phones[i][2] for i in idx]


def read_alignments(path: str | Path) -> dict[str, list[list]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such alignment file")
    with path.open(encoding="utf-8") as f:
        return {(d := json.loads(line))["fileid"]: d["phones"] for line in f if line.strip()}


def _aligned_frames(
    units: dict[str, np.ndarray],
    alignments: dict[str, list[list]],
    phone_names: dict[str, int],
    *,
    unit_rate: float,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per file in both (with units): its (phone index, unit) pairs at the phone frame rate; new phones are added to
    `phone_names`."""
    upsample = round(PHONE_FRAME_RATE / unit_rate)
    frames = {}
    for fid, u in units.items():
        if fid not in alignments or len(u) == 0:
            continue
        z = np.repeat(u, upsample)
        labels = frame_labels(alignments[fid], len(z))
        frames[fid] = (np.asarray([phone_names.setdefault(p, len(phone_names)) for p in labels]), z)
    if not frames:
        raise ValueError("no file has both units and a phone alignment: check data.alignments")
    return frames


def joint_counts(
    units: dict[str, np.ndarray],
    alignments: dict[str, list[list]],
    *,
    unit_rate: float,
) -> tuple[np.ndarray, list[str], int]:
    """(phones x units) frame counts over the files in both, the phone names, and the number of files used."""
    phone_names: dict[str, int] = {}
    frames = _aligned_frames(units, alignments, phone_names, unit_rate=unit_rate)
    y = np.concatenate([y for y, _ in frames.values()])
    z = np.concatenate([z for _, z in frames.values()])
    counts = np.zeros((len(phone_names), int(z.max()) + 1), dtype=np.int64)
    np.add.at(counts, (y, z), 1)
    return counts, list(phone_names), len(frames)


def quality_from_counts(counts: np.ndarray) -> dict[str, float]:
    p = counts / counts.sum()
    py, pz = p.sum(1), p.sum(0)
    nz = p > 0
    mutual_info = float((p[nz] * np.log(p[nz] / np.outer(py, pz)[nz])).sum())
    h_y = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    return {
        "pnmi": mutual_info / h_y if h_y > 0 else 0.0,
        "phone_purity": float(p.max(0).sum()),
        "cluster_purity": float(p.max(1).sum()),
    }


def unit_quality(
    units: dict[str, np.ndarray], alignments_path: str | Path, *, unit_rate: float = 50.0
) -> dict[str, float]:
    counts, phones, used = joint_counts(units, read_alignments(alignments_path), unit_rate=unit_rate)
    return {
        **quality_from_counts(counts),
        "num_files": used,
        "num_frames": int(counts.sum()),
        "num_phones": len(phones),
        "num_units_used": int((counts.sum(0) > 0).sum()),
    }


class _Flat(NamedTuple):
    """One unit system's frames over a list of files: (phone, unit) as one index, and each frame's file."""

    cells: np.ndarray
    file_of_frame: np.ndarray
    shape: tuple[int, int]

    def counts(self, file_weights: np.ndarray) -> np.ndarray:
        """The (phones x units) counts with each file counted `file_weights[file]` times."""
        flat = np.bincount(
            self.cells, weights=file_weights[self.file_of_frame], minlength=self.shape[0] * self.shape[1]
        )
        return flat.reshape(self.shape)


def _flatten(frames: dict[str, tuple[np.ndarray, np.ndarray]], files: list[str], num_phones: int) -> _Flat:
    num_units = int(max(frames[f][1].max() for f in files)) + 1
    cells = np.concatenate([frames[f][0] * num_units + frames[f][1] for f in files])
    file_of_frame = np.concatenate([np.full(len(frames[f][0]), i) for i, f in enumerate(files)])
    return _Flat(cells, file_of_frame, (num_phones, num_units))


def pnmi_gain(
    units: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    alignments: dict[str, list[list]],
    *,
    unit_rate: float = 50.0,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """PNMI of `units` minus PNMI of `baseline` over the files both have, with its 95 % bootstrap interval over
    those files: files drawn with replacement, the same draw for both systems (paired), `resamples` times; the
    interval is BCa (`scipy.stats.bootstrap`), as PNMI's plug-in estimate is biased by the duplicates of a draw.
    The interval says how much of the difference the choice of evaluation files alone makes: one excluding 0 is no
    tie on this split (it says nothing of the spread between training seeds)."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    phone_names: dict[str, int] = {}
    a = _aligned_frames(units, alignments, phone_names, unit_rate=unit_rate)
    b = _aligned_frames(baseline, alignments, phone_names, unit_rate=unit_rate)
    files = sorted(set(a) & set(b))
    if not files:
        raise ValueError("the two unit systems share no aligned file")
    flat = [_flatten(frames, files, len(phone_names)) for frames in (a, b)]

    def difference(drawn: np.ndarray) -> float:  # `drawn`: file indices, each counted as often as it is drawn
        weights = np.bincount(drawn, minlength=len(files)).astype(np.float64)
        return (
            quality_from_counts(flat[0].counts(weights))["pnmi"] - quality_from_counts(flat[1].counts(weights))["pnmi"]
        )

    every = np.arange(len(files))
    with warnings.catch_warnings():  # equal systems or one file: every draw the same, no BCa (handled below)
        warnings.simplefilter("ignore", DegenerateDataWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        result = bootstrap((every,), difference, n_resamples=resamples, vectorized=False, method="BCa",
                           rng=np.random.default_rng(seed))  # fmt: skip
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):  # every draw gave the same difference (one file, equal systems)
        low = high = float(result.bootstrap_distribution.min())
    return {"gain": difference(every), "low": float(low), "high": float(high), "num_files": len(files)}
