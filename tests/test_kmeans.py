import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.cluster import MiniBatchKMeans

from hubert_pipeline import kmeans
from hubert_pipeline.kmeans import (
    KMeansResult,
    fit_kmeans,
    load_centroids,
    load_centroids_metadata,
    predict,
    resolve_device,
    save_centroids,
)
from hubert_pipeline.store import FeatureStore, finalize_store, write_shard

FIT: dict[str, Any] = {
    "fit_fraction": 1.0,
    "seed": 0,
    "max_iter": 100,
    "tol": 1e-4,
    "n_init": 2,
    "chunk_frames": 100_000,
    "device": "cpu",
}


def fit_with(**overrides: Any) -> dict[str, Any]:
    """FIT's arguments with some changed."""
    return FIT | overrides


def make_store(root: Path, frames: np.ndarray, *, files: int = 20, shards: int = 2) -> FeatureStore:
    """A real feature store holding `frames` split into `files` files over `shards` shards."""
    parts = np.array_split(frames, files)
    items = [(f"file{i:03d}", part) for i, part in enumerate(parts)]
    per_shard = np.array_split(np.arange(files), shards)
    for shard, indices in enumerate(per_shard):
        write_shard(root, shard, [items[i] for i in indices], dtype="float32", dim=frames.shape[1])
    finalize_store(root, num_shards=shards, dim=frames.shape[1], dtype="float32", frame_rate=100.0)
    return FeatureStore(root)


def blobs(*, centers: int, dim: int, frames: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 10, (centers, dim))
    labels = rng.integers(0, centers, frames)
    return (means[labels] + rng.normal(0, spread, (frames, dim))).astype(np.float32), labels


@pytest.fixture
def overlapping(tmp_path) -> tuple[FeatureStore, np.ndarray]:
    """30 overlapping clusters in 8 dimensions: fitting 12 centroids has no obvious answer."""
    frames, _ = blobs(centers=30, dim=8, frames=4000, spread=4.0, seed=1)
    return make_store(tmp_path / "store", frames), frames


def test_fit_recovers_well_separated_blobs(tmp_path):
    frames, truth = blobs(centers=6, dim=4, frames=3000, spread=0.3)
    store = make_store(tmp_path / "store", frames)
    result = fit_kmeans(store, k=6, **FIT)
    labels = predict(frames, result.centroids).numpy()
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    assert len(pairs) == 6  # a bijection between found and true clusters
    assert (result.num_frames, result.num_files) == (3000, 20)
    assert result.centroids.shape == (6, 4)
    assert result.centroids.dtype == torch.float32
    assert result.inertia == pytest.approx(4 * 0.3**2, rel=0.1)


def test_same_seed_gives_identical_centroids(overlapping):
    store, _ = overlapping
    first = fit_kmeans(store, k=12, **FIT)
    again = fit_kmeans(store, k=12, **FIT)
    assert torch.equal(first.centroids, again.centroids)
    assert first.inertia == again.inertia


def test_streaming_fit_matches_in_memory_fit_without_holding_the_frames(overlapping, monkeypatch, caplog):
    store, _ = overlapping
    monkeypatch.setattr(kmeans, "INIT_SAMPLE_MIN", 500)  # the fit set must be larger than the init sample
    in_memory = fit_kmeans(store, k=12, **FIT)

    chunk_sizes: list[int] = []
    passes = 0
    iter_chunks = FeatureStore.iter_chunks

    def spy(self, fileids=None, *, chunk_frames):
        nonlocal passes
        passes += 1
        for chunk in iter_chunks(self, fileids, chunk_frames=chunk_frames):
            chunk_sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(FeatureStore, "iter_chunks", spy)
    with caplog.at_level("INFO", logger="hubert_pipeline.kmeans"):
        streamed = fit_kmeans(store, k=12, **fit_with(chunk_frames=250))
    assert "streamed" in caplog.text
    assert max(chunk_sizes) <= 250
    assert passes >= streamed.n_iter + 2  # the init sample, then one pass over the store per iteration
    torch.testing.assert_close(streamed.centroids, in_memory.centroids)
    assert streamed.inertia == pytest.approx(in_memory.inertia, rel=1e-6)
    assert streamed.n_iter == in_memory.n_iter


def test_inertia_is_no_worse_than_sklearn_minibatch_kmeans(overlapping):
    store, frames = overlapping
    ours = fit_kmeans(store, k=12, **fit_with(tol=1e-4, n_init=3))
    reference = MiniBatchKMeans(  # the recipe's settings (minimal_hubert.kmeans.build_kmeans), smaller batches
        12, init="k-means++", max_iter=100, batch_size=1000, random_state=0, tol=0.0, max_no_improvement=100, n_init=20
    ).fit(frames)
    reference_inertia = -reference.score(frames) / len(frames)
    assert ours.inertia <= reference_inertia * 1.001
    labels = predict(frames, ours.centroids)
    exact = ((torch.from_numpy(frames) - ours.centroids[labels]) ** 2).sum(1).double().mean()
    assert ours.inertia == pytest.approx(float(exact), rel=1e-5)


def test_empty_clusters_are_reseeded_with_the_farthest_frames():
    frames = torch.tensor([[0.0], [1.0], [10.0], [0.5]])
    centroids = torch.tensor([[0.5], [100.0], [-100.0]])  # every frame is nearest to the first centroid
    stats = kmeans._assignment_pass(iter((frames,)), centroids)
    assert stats.counts.tolist() == [4, 0, 0]
    assert stats.sse == pytest.approx(0.25 + 0.25 + 9.5**2)
    updated = kmeans._update(stats)
    assert updated[0].item() == pytest.approx(11.5 / 4)
    assert updated[1].item() == 10.0  # the farthest frame
    assert updated[2].item() in {0.0, 1.0}  # the next farthest


def test_fit_on_a_fraction_uses_only_the_sampled_files(overlapping):
    store, _ = overlapping
    result = fit_kmeans(store, k=5, **fit_with(fit_fraction=0.25))
    sampled = store.sample_fileids(0.25, seed=0)
    assert result.num_files == len(sampled) == 5
    assert result.num_frames == sum(len(store.get(f)) for f in sampled)


def test_save_and_load_round_trip_through_safetensors_with_metadata(tmp_path):
    result = KMeansResult(torch.randn(7, 3), inertia=1.25, n_iter=4, num_frames=100, num_files=2)
    path = tmp_path / "out" / "kmeans.safetensors"
    save_centroids(path, result, {"store": "features/mfcc"})
    assert torch.equal(load_centroids(path, dim=3), result.centroids)
    assert set(load_file(path)) == {"centroids"}  # plain safetensors: no pickle anywhere
    metadata = load_centroids_metadata(path)
    assert metadata["store"] == "features/mfcc"
    assert (float(metadata["inertia"]), metadata["k"], metadata["dim"], metadata["n_iter"]) == (1.25, "7", "3", "4")
    assert [p.name for p in path.parent.iterdir()] == ["kmeans.safetensors"]  # no temporary file left behind


def test_metadata_cannot_overwrite_the_fit_statistics(tmp_path):
    result = KMeansResult(torch.randn(2, 3), inertia=1.0, n_iter=1, num_frames=10, num_files=1)
    with pytest.raises(ValueError, match="'inertia' is reserved"):
        save_centroids(tmp_path / "kmeans.safetensors", result, {"inertia": "0"})
    assert not list(tmp_path.iterdir())


def test_k_larger_than_the_fit_frames_is_refused_with_both_numbers(tmp_path):
    store = make_store(tmp_path / "store", np.ones((40, 3), np.float32), files=4)
    with pytest.raises(
        ValueError, match=r"k=50 clusters but only 40 frames.*raise kmeans.fit_fraction or lower kmeans.k"
    ):
        fit_kmeans(store, k=50, **FIT)


@pytest.mark.parametrize("files", [0, 3])
def test_empty_store_is_refused_naming_its_folder(tmp_path, files):
    root = tmp_path / "empty"
    write_shard(root, 0, [(f"file{i}", np.zeros((0, 3), np.float32)) for i in range(files)], dtype="float32", dim=3)
    finalize_store(root, num_shards=1, dim=3, dtype="float32", frame_rate=100.0)
    with pytest.raises(ValueError, match=re.escape(f"{root}: the feature store is empty ({files} files, 0 frames)")):
        fit_kmeans(FeatureStore(root), k=2, **FIT)


@pytest.mark.parametrize(("key", "value"), [("k", 0), ("fit_fraction", 0.0), ("n_init", 0), ("chunk_frames", 0)])
def test_invalid_arguments_are_refused_naming_the_param(overlapping, key, value):
    store, _ = overlapping
    arguments: dict[str, Any] = {"k": 3} | FIT | {key: value}
    with pytest.raises(ValueError, match=rf"kmeans\.{key} must be"):
        fit_kmeans(store, **arguments)


def test_load_centroids_with_another_dim_names_the_file_and_both_dims(tmp_path):
    path = tmp_path / "kmeans.safetensors"
    save_centroids(path, KMeansResult(torch.randn(4, 39), inertia=1.0, n_iter=1, num_frames=10, num_files=1))
    with pytest.raises(ValueError, match=re.escape(f"{path}: centroids have dim 39 but the features have dim 768")):
        load_centroids(path, dim=768)


def test_load_centroids_of_a_missing_or_foreign_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_centroids(tmp_path / "missing.safetensors")
    foreign = tmp_path / "kmeans.pt"
    torch.save({"centroids": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ValueError, match=r"kmeans\.pt: not a readable safetensors file"):
        load_centroids(foreign)


def test_predict_with_another_dim_names_both_dims():
    with pytest.raises(ValueError, match="features have dim 5 but the centroids have dim 3"):
        predict(np.zeros((10, 5), np.float32), torch.zeros(4, 3))


def test_predict_gives_the_same_labels_for_any_chunking_and_input_type():
    frames, _ = blobs(centers=10, dim=6, frames=1000, spread=3.0)
    centroids = torch.from_numpy(frames[:10].copy())
    labels = predict(torch.from_numpy(frames), centroids)
    assert labels.dtype == torch.int64
    assert torch.equal(predict(frames, centroids, chunk_frames=7), labels)
    assert torch.equal(
        predict(frames.astype(np.float16).astype(np.float32), centroids), predict(frames.astype(np.float16), centroids)
    )
    distances = torch.cdist(torch.from_numpy(frames).double(), centroids.double())
    assert torch.equal(labels, distances.argmin(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_refused_clearly():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_cli_fits_a_store_and_writes_safetensors(overlapping, tmp_path, monkeypatch, capsys):
    store, _ = overlapping
    output = tmp_path / "kmeans.safetensors"
    argv = [str(store.root), str(output), "--k", "4", "--fit-fraction", "0.5", "--n-init", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["kmeans", *argv])
    kmeans.main()
    assert load_centroids(output, dim=8).shape == (4, 8)
    assert load_centroids_metadata(output)["fit_fraction"] == "0.5"
    assert "k=4" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(overlapping, tmp_path, monkeypatch, capsys):
    store, _ = overlapping
    output = tmp_path / "kmeans.safetensors"
    monkeypatch.setattr(sys, "argv", ["kmeans", str(store.root), str(output), "--k", "100000", "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        kmeans.main()
    assert exited.value.code == 2
    assert "k=100000 clusters but only 400 frames to fit them on (2 of the 20 files" in capsys.readouterr().err
    assert not output.exists()


def test_cli_help_shows_defaults_without_importing_torch():
    script = (
        "import runpy, sys\n"
        "sys.argv = ['kmeans', '--help']\n"
        "try:\n"
        "    runpy.run_module('hubert_pipeline.kmeans', run_name='__main__')\n"
        "except SystemExit:\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30)
    assert "--fit-fraction FIT_FRACTION" in done.stdout
    assert "(default: 0.1)" in done.stdout
    assert "torch imported: False" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_matches_cpu_fit(tmp_path):
    frames, _ = blobs(centers=6, dim=4, frames=3000, spread=0.3)
    store = make_store(tmp_path / "store", frames)
    cpu = fit_kmeans(store, k=6, **FIT)
    cuda = fit_kmeans(store, k=6, **fit_with(device="cuda"))
    assert cuda.centroids.device == torch.device("cpu")
    torch.testing.assert_close(cuda.centroids, cpu.centroids, rtol=1e-4, atol=1e-4)
    assert cuda.inertia == pytest.approx(cpu.inertia, rel=1e-4)
