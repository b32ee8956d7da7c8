import json

import numpy as np
import polars as pl
import pytest
import torch
from spidr.config import DEFAULT_CONV_LAYER_CONFIG
from spidr.data.dataset import conv_length

from hubert_pipeline.units import LengthMismatchError, merge_units, model_frames, read_units


def test_model_frames_equal_spidr_conv_length():
    lengths = torch.tensor([0, 399, 400, 719, 720, 16000, 160_000, 250_000, 123_457])
    expected = conv_length(DEFAULT_CONV_LAYER_CONFIG, lengths).tolist()
    assert [model_frames(int(n)) for n in lengths] == expected


@pytest.mark.parametrize("num_samples", [400, 559, 560, 16000, 16001, 48_123, 250_000])
def test_every_second_mfcc_frame_gives_exactly_the_model_frame_count(num_samples):
    mfcc_frames = 1 + (num_samples - 400) // 160  # kaldi snip_edges
    assert len(range(mfcc_frames)[::2]) == model_frames(num_samples)


def manifest(lengths):
    return pl.DataFrame(
        {"fileid": [f"f{i}" for i in range(len(lengths))], "path": ["p"] * len(lengths), "num_samples": lengths}
    )


def test_merged_manifest_keeps_columns_and_takes_every_second_frame(tmp_path):
    m = manifest([16000, 8000])
    units = {"f0": list(range(98)), "f1": list(range(48))}
    report = merge_units(m, units, tmp_path / "out.jsonl", step=2, tolerance=0)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["fileid"] for r in rows] == ["f0", "f1"]
    assert rows[0]["units"] == list(range(0, 98, 2))
    assert len(rows[1]["units"]) == model_frames(8000)
    assert set(rows[0]) == {"fileid", "path", "num_samples", "units"}
    assert report.num_adjusted == 0
    assert {k: len(v) for k, v in read_units(tmp_path / "out.jsonl").items()} == {"f0": 49, "f1": 24}


def test_rerun_of_merge_writes_a_byte_identical_file(tmp_path):
    m = manifest([16000])
    units = {"f0": list(range(49))}
    merge_units(m, units, tmp_path / "out.jsonl", step=1, tolerance=0)
    first = (tmp_path / "out.jsonl").read_bytes()
    merge_units(m, units, tmp_path / "out.jsonl", step=1, tolerance=0)
    assert (tmp_path / "out.jsonl").read_bytes() == first


def test_small_length_differences_are_truncated_or_padded_within_tolerance(tmp_path):
    m = manifest([16000, 16000])
    report = merge_units(m, {"f0": [1] * 51, "f1": [2] * 47}, tmp_path / "o.jsonl", step=1, tolerance=2)
    units = read_units(tmp_path / "o.jsonl")
    assert len(units["f0"]) == len(units["f1"]) == 49
    assert report.num_adjusted == 2
    assert report.max_abs_diff == 2


def test_length_mismatch_beyond_tolerance_names_the_file_and_writes_nothing(tmp_path):
    m = manifest([16000, 16000])
    with pytest.raises(LengthMismatchError, match="f1: 40 units for 49 model frames"):
        merge_units(m, {"f0": [1] * 49, "f1": [2] * 40}, tmp_path / "o.jsonl", step=1, tolerance=2)
    assert not (tmp_path / "o.jsonl").exists()
    assert not list(tmp_path.iterdir())


def test_files_without_units_or_units_without_files_are_errors(tmp_path):
    m = manifest([16000])
    with pytest.raises(ValueError, match=r"1 file\(s\) of the manifest are missing from the units for .*o\.jsonl"):
        merge_units(m, {}, tmp_path / "o.jsonl", step=1, tolerance=0)
    with pytest.raises(ValueError, match=r"1 file\(s\) of the units for .*o\.jsonl are not in the manifest"):
        merge_units(m, {"f0": [0] * 49, "zz": [1]}, tmp_path / "o.jsonl", step=1, tolerance=0)


def test_units_are_keyed_by_the_one_file_id_function(tmp_path):
    from hubert_pipeline.audio import file_id

    assert np.array_equal(np.array([file_id("/a/b/f0.wav")]), np.array(["f0"]))


def test_a_store_missing_a_manifests_file_is_named_before_any_transcription(tmp_path):
    from conftest import tone, write_wav

    from hubert_pipeline.features import extract_mfcc
    from hubert_pipeline.manifest import build_manifest, write_csv
    from hubert_pipeline.params import ExecutionParams, MfccParams
    from hubert_pipeline.units import units_for_split

    for name in ("a", "b"):
        write_wav(tmp_path / "wav" / f"{name}.wav", tone(0.5))
    write_csv(build_manifest(tmp_path / "wav")[0], tmp_path / "old.csv")
    extract_mfcc(tmp_path / "old.csv", tmp_path / "store", params=MfccParams(num_shards=1), execution=ExecutionParams())
    write_wav(tmp_path / "wav" / "c.wav", tone(0.5))
    write_csv(build_manifest(tmp_path / "wav")[0], tmp_path / "new.csv")
    with pytest.raises(
        ValueError, match=r"1 file\(s\) of manifest .*new\.csv are missing from store .*store, e\.g\. \['c'\]"
    ):
        units_for_split(tmp_path / "new.csv", tmp_path / "store", tmp_path / "no-centroids.safetensors",
                        tmp_path / "units.jsonl", tolerance=2, execution=ExecutionParams())  # fmt: skip


def test_units_as_int32_arrays_or_lists_merge_into_the_same_bytes(tmp_path):
    m = manifest([16000, 16000, 400, 8000])  # 49, 49, 1 and 24 model frames
    lists = {"f0": list(range(98)), "f1": [3] * 101, "f2": [], "f3": [7] * 47}  # f1 truncated, f2 padded with 0
    arrays = {fid: np.asarray(u, dtype=np.int32) for fid, u in lists.items()}
    report = merge_units(m, lists, tmp_path / "lists.jsonl", step=2, tolerance=2)
    assert merge_units(m, arrays, tmp_path / "arrays.jsonl", step=2, tolerance=2) == report
    assert (tmp_path / "arrays.jsonl").read_bytes() == (tmp_path / "lists.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "arrays.jsonl").read_text().splitlines()]
    assert [r["units"] for r in rows[2:]] == [[0], [7] * 24]
    assert report.num_adjusted == 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_units_of_a_memory_mapped_shard_equal_those_of_its_copy_in_memory(tmp_path, dtype):
    from safetensors.torch import save_file

    from hubert_pipeline.kmeans import predict
    from hubert_pipeline.store import FeatureStore, finalize_store, write_shard
    from hubert_pipeline.units import transcribe_shard

    rng = np.random.default_rng(0)
    items = [(f"f{i}", rng.normal(size=(n, 5)).astype(np.float32)) for i, n in enumerate([70_000, 3, 0, 900])]
    write_shard(tmp_path / "store", 0, items, dtype=dtype, dim=5)
    finalize_store(tmp_path / "store", num_shards=1, dim=5, dtype=dtype, frame_rate=100.0)
    centroids = torch.from_numpy(rng.normal(size=(20, 5)).astype(np.float32))
    save_file({"centroids": centroids}, tmp_path / "c.safetensors")
    transcribe_shard(str(tmp_path / "store"), str(tmp_path / "c.safetensors"), str(tmp_path / "parts"), 0)
    parts = json.loads((tmp_path / "parts" / "shard-00000.json").read_text())
    in_memory = predict(torch.from_numpy(np.array(FeatureStore(tmp_path / "store").shard(0), np.float32)), centroids)
    assert np.concatenate([parts[fid] for fid, _ in items]).tolist() == in_memory.tolist()
