import json

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from hubert_pipeline.unit_metrics import (
    frame_labels,
    joint_counts,
    pnmi_corrected,
    pnmi_gain,
    quality_from_counts,
    unit_quality,
)


def test_units_identical_to_phones_give_perfect_scores():
    counts = np.diag([10, 20, 30])
    q = quality_from_counts(counts)
    assert q == pytest.approx({"pnmi": 1.0, "phone_purity": 1.0, "cluster_purity": 1.0})


def test_units_independent_of_phones_give_zero_pnmi():
    counts = np.ones((4, 5), dtype=int) * 7
    q = quality_from_counts(counts)
    assert q["pnmi"] == pytest.approx(0.0, abs=1e-12)
    assert q["phone_purity"] == pytest.approx(0.25)
    assert q["cluster_purity"] == pytest.approx(0.2)


def test_pnmi_equals_mutual_information_over_phone_entropy_from_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 5000)
    z = (y * 3 + rng.integers(0, 4, 5000)) % 17
    counts = np.zeros((6, 17), dtype=int)
    np.add.at(counts, (y, z), 1)
    py = np.bincount(y) / len(y)
    expected = mutual_info_score(y, z) / -(py * np.log(py)).sum()
    assert quality_from_counts(counts)["pnmi"] == pytest.approx(expected, rel=1e-9)


def test_frame_labels_take_the_phone_at_each_frame_centre():
    phones = [[0.0, 0.03, "pau"], [0.03, 0.05, "a"], [0.05, 0.07, "b"]]
    assert frame_labels(phones, 8) == ["pau", "pau", "pau", "a", "a", "b", "b", "b"]


def test_units_are_upsampled_to_the_phone_rate(tmp_path):
    alignments = {"u": [[0.0, 0.04, "a"], [0.04, 0.08, "b"]]}
    counts, phones, used = joint_counts({"u": np.array([3, 3, 5, 5])}, alignments, unit_rate=50.0)
    assert used == 1
    assert phones == ["a", "b"]
    assert counts[0, 3] == 4
    assert counts[1, 5] == 4


def test_unit_quality_reads_alignment_files_and_skips_unaligned_units(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"fileid": "u", "phones": [[0.0, 0.04, "a"], [0.04, 0.08, "b"]]}) + "\n")
    q = unit_quality({"u": np.array([0, 0, 1, 1]), "other": np.array([1, 2])}, path)
    assert q["num_files"] == 1
    assert q["pnmi"] == pytest.approx(1.0)


def test_no_overlap_between_units_and_alignments_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"fileid": "u", "phones": [[0.0, 0.04, "a"]]}) + "\n")
    with pytest.raises(ValueError, match=r"data\.alignments"):
        unit_quality({"v": np.array([0])}, path)


def _corpus(num_files: int, seed: int) -> tuple[dict[str, list[list]], dict[str, np.ndarray]]:
    """Alignments of `num_files` files of 5 phones x 40 ms each, and units that are each frame's phone."""
    rng = np.random.default_rng(seed)
    alignments, phones = {}, {}
    for i in range(num_files):
        names = rng.choice(["a", "b", "c", "d", "e", "f"], 5)
        alignments[f"f{i}"] = [[0.04 * j, 0.04 * (j + 1), str(p)] for j, p in enumerate(names)]
        phones[f"f{i}"] = np.repeat(np.asarray(["abcdef".index(p) for p in names]), 2)  # 2 units (50 Hz) a phone
    return alignments, phones


def test_pnmi_gain_is_the_difference_of_the_two_pnmis_over_the_shared_files_bias_corrected(tmp_path):
    alignments, phones = _corpus(40, seed=0)
    rng = np.random.default_rng(1)
    noisy = {f: np.where(rng.random(len(u)) < 0.3, rng.integers(0, 6, len(u)), u) for f, u in phones.items()}
    noisier = {f: np.where(rng.random(len(u)) < 0.6, rng.integers(0, 6, len(u)), u) for f, u in phones.items()}
    del noisier["f0"]  # only the files both systems have are compared
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps({"fileid": f, "phones": p}) + "\n" for f, p in alignments.items()))
    shared = {f: u for f, u in noisy.items() if f != "f0"}
    gain = pnmi_gain(noisy, noisier, alignments)
    plug_in = unit_quality(shared, path)["pnmi"] - unit_quality(noisier, path)["pnmi"]
    assert gain["plug_in"] == pytest.approx(plug_in, abs=1e-12)
    assert gain["num_files"] == 39
    assert gain["gain"] == pytest.approx(plug_in, abs=0.02)  # the bias correction: a small adjustment
    assert 0 < gain["low"] < gain["gain"] < gain["high"]  # 30 % against 60 % of random units: clearly better
    assert gain["high"] - gain["low"] == pytest.approx(2 * 1.96 * gain["se"])


def test_pnmi_gain_of_a_system_over_itself_is_zero_and_of_equal_systems_spans_zero():
    alignments, phones = _corpus(40, seed=0)
    zero = {"gain": 0.0, "plug_in": 0.0, "low": 0.0, "high": 0.0, "se": 0.0, "num_files": 40}
    assert pnmi_gain(phones, phones, alignments) == pytest.approx(zero, abs=1e-12)
    rng = np.random.default_rng(2)
    draws = [{f: np.where(rng.random(len(u)) < 0.5, rng.integers(0, 6, len(u)), u) for f, u in phones.items()}
             for _ in range(2)]  # fmt: skip
    gain = pnmi_gain(draws[0], draws[1], alignments)  # two draws of the same noise: no real difference
    assert gain["low"] < 0 < gain["high"]


def test_pnmi_gain_interval_narrows_with_more_files():
    widths = []
    for num_files in (20, 320):
        alignments, phones = _corpus(num_files, seed=3)
        rng = np.random.default_rng(4)
        noisy = {f: np.where(rng.random(len(u)) < 0.4, rng.integers(0, 6, len(u)), u) for f, u in phones.items()}
        gain = pnmi_gain(phones, noisy, alignments)
        widths.append(gain["high"] - gain["low"])
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(16) of it


def _systems(num_files: int, seed: int) -> tuple:
    """Two unit systems of a corpus and its alignments: 4 units a phone (narrow), and 30 % of frames spread over
    200 units (wide)."""
    alignments, phones = _corpus(num_files, seed=seed)
    rng = np.random.default_rng(seed + 100)
    narrow = {f: u * 4 + rng.integers(0, 4, len(u)) for f, u in phones.items()}
    wide = {f: np.where(rng.random(len(u)) < 0.3, rng.integers(0, 200, len(u)), u * 4) for f, u in phones.items()}
    return narrow, wide, alignments


def test_pnmi_gain_on_a_small_split_is_nearer_a_large_splits_than_the_plug_in_difference():
    """Many units for few frames inflate plug-in PNMI, the more for units spread wider: the jackknife removes most
    of that from the gain (docs/learning.md, "How large a PNMI difference the valid split can tell")."""
    # the demo's ratio of frames to units (valid: 24000 frames for 500 units, PNMI 0.05 too high by the jackknife)
    large = pnmi_gain(*_systems(8000, seed=0))["gain"]  # 160000 frames: bias-corrected and plug-in agree within 0.004
    small = [pnmi_gain(*_systems(400, seed=seed)) for seed in range(1, 5)]  # 8000 frames each, 40 for a wide unit
    corrected, plug_in = (np.mean([g[key] for g in small]) for key in ("gain", "plug_in"))
    assert abs(plug_in - large) > 0.05  # the plug-in difference of a small split is far off
    assert abs(corrected - large) < abs(plug_in - large) / 4


def test_bias_corrected_pnmi_is_nearer_a_large_splits_and_its_difference_is_the_gain(tmp_path):
    """Wide-spread units on a split of the demo's ratio of frames to units: the plug-in PNMI is far above the
    large-split value, the jackknife's is near it; over the same files the gain is the corrected PNMIs' difference
    (the jackknife is linear)."""
    large = pnmi_corrected(*_systems(8000, seed=0)[1:])
    assert large["pnmi"] == pytest.approx(large["plug_in"], abs=0.01)  # 160000 frames: little bias
    small = [pnmi_corrected(*_systems(400, seed=seed)[1:]) for seed in range(1, 5)]
    corrected, plug_in = (np.mean([s[key] for s in small]) for key in ("pnmi", "plug_in"))
    assert plug_in - large["pnmi"] > 0.05  # too high
    assert abs(corrected - large["pnmi"]) < (plug_in - large["pnmi"]) / 4
    narrow, wide, alignments = _systems(40, seed=5)
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps({"fileid": f, "phones": p}) + "\n" for f, p in alignments.items()))
    assert small[0]["num_files"] == 400
    assert pnmi_corrected(wide, alignments)["plug_in"] == pytest.approx(unit_quality(wide, path)["pnmi"], abs=1e-12)
    gain = pnmi_gain(wide, narrow, alignments)["gain"]
    difference = pnmi_corrected(wide, alignments)["pnmi"] - pnmi_corrected(narrow, alignments)["pnmi"]
    assert gain == pytest.approx(difference, abs=1e-12)


def test_pnmi_gain_refuses_systems_without_a_shared_file():
    alignments, phones = _corpus(4, seed=0)
    with pytest.raises(ValueError, match="share no aligned file"):
        pnmi_gain({"f0": phones["f0"]}, {"f1": phones["f1"]}, alignments)
