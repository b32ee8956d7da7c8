"""Unit quality against phone alignments (HuBERT paper §IV-E, fairseq `measure_teacher_quality.py`).

With joint frame counts of phone y and unit z (units upsampled to the 100 Hz phone frame rate):
phone purity = E_z[max_y p(y|z)], cluster purity = E_y[max_z p(z|y)], PNMI = I(y;z) / H(y).
Alignments are JSONL lines `{"fileid", "phones": [[onset_s, offset_s, phone], ...]}` (the demo corpus writes them).
"""

import json
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


class _FileCounts(NamedTuple):
    """One unit system's (phones x units) frame counts over a list of files, and each file's share of them."""

    total: np.ndarray
    files: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per file: its cells (phone, unit) and their counts

    def without(self, i: int) -> np.ndarray:
        """The counts of every file but the `i`-th."""
        counts = self.total.copy()
        phones, units, n = self.files[i]
        counts[phones, units] -= n
        return counts


def _file_counts(frames: dict[str, tuple[np.ndarray, np.ndarray]], files: list[str], num_phones: int) -> _FileCounts:
    num_units = int(max(frames[f][1].max() for f in files)) + 1
    total = np.zeros((num_phones, num_units), dtype=np.int64)
    shares = []
    for f in files:
        cells, n = np.unique(frames[f][0] * num_units + frames[f][1], return_counts=True)
        phones, units = np.divmod(cells, num_units)
        total[phones, units] += n
        shares.append((phones, units, n))
    return _FileCounts(total, shares)


def joint_counts(
    units: dict[str, np.ndarray],
    alignments: dict[str, list[list]],
    *,
    unit_rate: float,
) -> tuple[np.ndarray, list[str], int]:
    """(phones x units) frame counts over the files in both, the phone names, and the number of files used."""
    phone_names: dict[str, int] = {}
    frames = _aligned_frames(units, alignments, phone_names, unit_rate=unit_rate)
    return _file_counts(frames, list(frames), len(phone_names)).total, list(phone_names), len(frames)


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


def pnmi_gain(
    units: dict[str, np.ndarray], baseline: dict[str, np.ndarray], alignments: dict[str, list[list]], *,
    unit_rate: float = 50.0,
) -> dict[str, float]:  # fmt: skip
    """PNMI of `units` minus PNMI of `baseline` over the files both have (`plug_in`), and by the delete-one-file
    jackknife (the difference recomputed without each file in turn, both systems without the same file) the
    bias-corrected gain (`gain`: plug-in PNMI of many units on few frames is too high, the more for units spread
    wider), its standard error and 95 % interval (gain +- 1.96 se). The interval says how much of the difference
    the choice of evaluation files alone makes: one excluding 0 is no tie on this split (it says nothing of the
    spread between training seeds). A jackknife, not a bootstrap: the duplicated files of a bootstrap draw inflate
    PNMI further, by more for the system of wider-spread units, which moves every draw's gain off the estimate."""
    phone_names: dict[str, int] = {}
    a = _aligned_frames(units, alignments, phone_names, unit_rate=unit_rate)
    b = _aligned_frames(baseline, alignments, phone_names, unit_rate=unit_rate)
    files = sorted(set(a) & set(b))
    if not files:
        raise ValueError("the two unit systems share no aligned file")
    counts = [_file_counts(frames, files, len(phone_names)) for frames in (a, b)]
    plug_in = _pnmi(counts[0].total) - _pnmi(counts[1].total)
    n = len(files)
    without = np.asarray([_pnmi(counts[0].without(i)) - _pnmi(counts[1].without(i)) for i in range(n)])
    gain, se = _jackknife(plug_in, without)
    return {"gain": gain, "plug_in": plug_in, "low": gain - 1.96 * se, "high": gain + 1.96 * se, "se": se,
            "num_files": n}  # fmt: skip


def pnmi_corrected(
    units: dict[str, np.ndarray], alignments: dict[str, list[list]], *, unit_rate: float = 50.0
) -> dict[str, float]:
    """PNMI of `units` corrected for its small-sample bias by the delete-one-file jackknife (`pnmi`), its standard
    error, and the plug-in value (`plug_in`, unit_quality's and fairseq's). The plug-in PNMI of many units on few
    frames is too high (the demo's valid split: 24,000 frames for 500 units, about +0.05); the corrected value is
    what a large split of the same speech would give, and the one to hold against published figures."""
    phone_names: dict[str, int] = {}
    frames = _aligned_frames(units, alignments, phone_names, unit_rate=unit_rate)
    counts = _file_counts(frames, list(frames), len(phone_names))
    plug_in = _pnmi(counts.total)
    pnmi, se = _jackknife(plug_in, np.asarray([_pnmi(counts.without(i)) for i in range(len(frames))]))
    return {"pnmi": pnmi, "plug_in": plug_in, "se": se, "num_files": len(frames)}


def _pnmi(counts: np.ndarray) -> float:
    return quality_from_counts(counts)["pnmi"]


def _jackknife(value: float, without: np.ndarray) -> tuple[float, float]:
    """A statistic's bias-corrected estimate and standard error from its `value` over all n files and its values
    `without` each file in turn (delete-one jackknife)."""
    n = len(without)
    corrected = n * value - (n - 1) * float(without.mean())
    se = float(np.sqrt((n - 1) / n * ((without - without.mean()) ** 2).sum())) if n > 1 else 0.0
    return corrected, se
