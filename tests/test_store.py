import json

import numpy as np
import polars as pl
import pytest
import torch

from hubert_pipeline.store import (
    FeatureStore,
    IncompleteStoreError,
    assign_shards,
    finalize_store,
    shard_index_path,
    write_shard,
)


def make_store(root, lengths, *, num_shards=2, dim=3, dtype="float32", deltas=0):
    rng = np.random.default_rng(0)
    stored = dim // (deltas + 1)
    items = {f"f{i:03d}": rng.normal(size=(n, stored)).astype(np.float32) for i, n in enumerate(lengths)}
    manifest = pl.DataFrame({"fileid": list(items), "path": list(items), "num_samples": lengths})
    sharded = assign_shards(manifest, num_shards)
    for s in range(num_shards):
        ids = sharded.filter(pl.col("shard") == s)["fileid"]
        write_shard(root, s, ((fid, items[fid]) for fid in ids), dtype=dtype, dim=stored)
    finalize_store(root, num_shards=num_shards, dim=dim, dtype=dtype, frame_rate=100.0, deltas=deltas)
    return items


def test_every_file_reads_back_exactly_from_its_shard(tmp_path):
    items = make_store(tmp_path / "s", [5, 7, 0, 11, 3], num_shards=3)
    store = FeatureStore(tmp_path / "s")
    assert store.meta.num_files == 5
    assert store.meta.num_frames == 26
    for fid, array in items.items():
        np.testing.assert_array_equal(store.get(fid), array)


def test_shard_assignment_is_contiguous_balanced_and_deterministic():
    manifest = pl.DataFrame({"fileid": [f"f{i}" for i in range(10)], "path": ["p"] * 10, "num_samples": [100] * 10})
    a = assign_shards(manifest.sample(fraction=1.0, shuffle=True, seed=1), 5)
    b = assign_shards(manifest, 5)
    assert a.equals(b)
    assert b["shard"].to_list() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_chunks_cover_the_requested_files_in_order_with_bounded_size(tmp_path):
    items = make_store(tmp_path / "s", [5, 7, 4])
    store = FeatureStore(tmp_path / "s")
    chunks = list(store.iter_chunks(["f002", "f000"], chunk_frames=4))
    assert [len(c) for c in chunks] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([items["f002"], items["f000"]]))


def test_store_without_meta_is_refused_as_incomplete(tmp_path):
    make_store(tmp_path / "s", [5, 7])
    (tmp_path / "s" / "meta.json").unlink()
    with pytest.raises(IncompleteStoreError, match=r"no meta\.json"):
        FeatureStore(tmp_path / "s")


def test_finalize_refuses_a_store_with_a_missing_shard(tmp_path):
    make_store(tmp_path / "s", [5, 7])
    shard_index_path(tmp_path / "s", 1).unlink()
    with pytest.raises(IncompleteStoreError, match=r"shards \[1\]"):
        finalize_store(tmp_path / "s", num_shards=2, dim=3, dtype="float32", frame_rate=100.0)


def test_fp16_store_keeps_values_within_half_precision(tmp_path):
    items = make_store(tmp_path / "s", [50], num_shards=1, dtype="float16")
    store = FeatureStore(tmp_path / "s")
    assert store.get("f000").dtype == np.float16
    np.testing.assert_allclose(store.get("f000").astype(np.float32), items["f000"], rtol=1e-3, atol=1e-3)


def test_wrong_feature_shape_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="'bad'"):
        write_shard(tmp_path, 0, [("bad", np.zeros((3, 4)))], dtype="float32", dim=3)
    assert not list(tmp_path.glob("*.npy"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("lengths", [[], [0], [5, 0, 7], [100_000, 3]])
def test_streamed_shard_is_byte_identical_to_np_save_of_the_concatenation(tmp_path, dtype, lengths):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(2 * n, 13))[::2] for n in lengths]  # float64, not contiguous: cast and copied
    frames = write_shard(tmp_path, 0, ((f"f{i}", a) for i, a in enumerate(arrays)), dtype=dtype, dim=13)
    reference = tmp_path / "reference.npy"
    np.save(reference, np.concatenate([a.astype(dtype) for a in arrays]) if arrays else np.zeros((0, 13), dtype))
    assert frames == sum(lengths)
    assert (tmp_path / "shard-00000.npy").read_bytes() == reference.read_bytes()


def test_fraction_sample_is_seeded(tmp_path):
    make_store(tmp_path / "s", [3] * 20)
    store = FeatureStore(tmp_path / "s")
    assert store.sample_fileids(0.1, seed=0) == store.sample_fileids(0.1, seed=0)
    assert len(store.sample_fileids(0.1, seed=0)) == 2
    assert store.sample_fileids(0.5, seed=0) != store.sample_fileids(0.5, seed=1)


def with_torchaudio_deltas(static: np.ndarray) -> torch.Tensor:
    """The reference: torchaudio's compute_deltas (win_length 5, edges replicated) twice, as minimal_hubert does."""
    from torchaudio.functional import compute_deltas

    x = torch.from_numpy(static.astype(np.float32)).T
    delta = compute_deltas(x)
    return torch.cat([x, delta, compute_deltas(delta)]).T


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_store_of_static_coefficients_reads_them_with_their_deltas_per_file(tmp_path, dtype):
    items = make_store(tmp_path / "s", [1, 2, 5, 0, 40], num_shards=2, dim=39, dtype=dtype, deltas=2)
    store = FeatureStore(tmp_path / "s")
    assert (store.meta.dim, store.meta.stored_dim, store.meta.deltas) == (39, 13, 2)
    assert {np.load(tmp_path / "s" / f"shard-0000{i}.npy").shape[1] for i in range(2)} == {13}
    for fid, static in items.items():
        features = store.get(fid)
        assert features.dtype == np.float32
        assert features.shape == (len(static), 39)
        if not len(static):
            continue
        reference = with_torchaudio_deltas(static.astype(dtype))  # the stored values (float16: rounded)
        torch.testing.assert_close(torch.from_numpy(features), reference, rtol=1e-6, atol=1e-6)
    chunks = list(store.iter_chunks(["f004", "f002"], chunk_frames=16))
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([store.get("f004"), store.get("f002")]))


def test_a_store_whose_dim_is_not_a_multiple_of_its_delta_orders_is_refused(tmp_path):
    make_store(tmp_path / "s", [5], num_shards=1, dim=3)
    with pytest.raises(ValueError, match="dim 3 is not a multiple of deltas"):
        finalize_store(tmp_path / "s", num_shards=1, dim=3, dtype="float32", frame_rate=100.0, deltas=1)


def test_a_store_written_before_the_deltas_field_reads_as_it_was(tmp_path):
    items = make_store(tmp_path / "s", [4, 6], dim=39)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    del meta["deltas"]
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    store = FeatureStore(tmp_path / "s")
    assert store.meta.deltas == 0
    for fid, array in items.items():
        np.testing.assert_array_equal(store.get(fid), array)
