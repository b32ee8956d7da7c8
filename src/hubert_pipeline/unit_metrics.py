"""Unit quality against phone alignments (HuBERT paper §IV-E, fairseq `measure_teacher_quality.py`).

With joint frame counts of phone y and unit z (units upsampled to the 100 Hz phone frame rate):
phone purity = E_z[max_y p(y|z)], cluster purity = E_y[max_z p(z|y)], PNMI = I(y;z) / H(y).
Alignments are JSONL lines `{"fileid", "phones": [[onset_s, offset_s, phone], ...]}` (the demo corpus writes them).
"""

import json
from pathlib import Path

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


def joint_counts(
    units: dict[str, np.ndarray],
    alignments: dict[str, list[list]],
    *,
    unit_rate: float,
) -> tuple[np.ndarray, list[str], int]:
    """(phones x units) frame counts over the files in both, the phone names, and the number of files used."""
    upsample = round(PHONE_FRAME_RATE / unit_rate)
    phone_names: dict[str, int] = {}
    ys, zs = [], []
    used = 0
    for fid, u in units.items():
        if fid not in alignments or len(u) == 0:
            continue
        used += 1
        z = np.repeat(u, upsample)
        labels = frame_labels(alignments[fid], len(z))
        ys.append(np.asarray([phone_names.setdefault(p, len(phone_names)) for p in labels]))
        zs.append(z)
    if not used:
        raise ValueError("no file has both units and a phone alignment: check data.alignments")
    y, z = np.concatenate(ys), np.concatenate(zs)
    counts = np.zeros((len(phone_names), int(z.max()) + 1), dtype=np.int64)
    np.add.at(counts, (y, z), 1)
    return counts, list(phone_names), used


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
