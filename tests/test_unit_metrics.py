import json

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from hubert_pipeline.unit_metrics import frame_labels, joint_counts, quality_from_counts, unit_quality


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
