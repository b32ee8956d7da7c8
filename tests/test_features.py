import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from hubert_pipeline.audio import load_audio, load_samples, source_of
from hubert_pipeline.features import DIM, extract_mfcc, mfcc, mfcc_batch, num_frames
from hubert_pipeline.kaldi import NUM_CEPS
from hubert_pipeline.launch import TaskError
from hubert_pipeline.manifest import build_manifest, read_manifest, write_csv
from hubert_pipeline.mfcc_cpu import with_deltas
from hubert_pipeline.mfcc_torch import mfcc_tensors
from hubert_pipeline.params import ExecutionParams, MfccParams
from hubert_pipeline.store import FeatureStore, shard_index_path, shard_path

SENTENCES = (
    ("voice_kal_diphone", "The quick brown fox jumps over the lazy dog."),
    ("voice_ked_diphone", "Free software is a matter of liberty, not price."),
    ("voice_kal_diphone", "Hello there."),
    (
        "voice_ked_diphone",
        "You may copy and distribute verbatim copies of this document, but changing it is not allowed.",
    ),
)
# cut from the first sentence: shorter than one frame, exactly one frame, one sample more, two frames, one second
PIECES = {"short": 399, "exact": 400, "plus1": 401, "two": 560, "second": 16_000}
TOLERANCE: dict[str, Any] = {"rtol": 1e-4, "atol": 1e-3}


def reference_mfcc(waveform: torch.Tensor) -> torch.Tensor:
    """minimal_hubert.features.mfcc: torchaudio's kaldi MFCC, then compute_deltas twice."""
    from minimal_hubert.features import mfcc as reference

    return reference(waveform[None])


def write_pcm(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(samples.astype("<i2").tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real speech (festival) plus pieces of it of edge-case lengths, and its manifest.csv."""
    root = tmp_path_factory.mktemp("speech")
    (root / "wav").mkdir()
    runs = [
        subprocess.Popen(
            ["text2wave", "-o", str(root / "wav" / f"s{i}.wav"), "-eval", f"({voice})"], stdin=subprocess.PIPE
        )
        for i, (voice, _) in enumerate(SENTENCES)
    ]
    for run, (_, text) in zip(runs, SENTENCES, strict=True):
        run.communicate(text.encode())
        assert run.returncode == 0
    with wave.open(str(root / "wav" / "s0.wav")) as w:
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    for name, length in PIECES.items():
        write_pcm(root / "wav" / f"p-{name}.wav", speech[8000 : 8000 + length])
    write_csv(build_manifest(root / "wav")[0], root / "manifest.csv")
    return root


@pytest.fixture(scope="module")
def waveforms(corpus: Path) -> dict[str, torch.Tensor]:
    return {
        row["fileid"]: load_audio(source_of(row))
        for row in read_manifest(corpus / "manifest.csv").iter_rows(named=True)
    }


def extract(corpus: Path, store: Path, *, workers: int = 1, **params: Any) -> None:
    extract_mfcc(
        corpus / "manifest.csv",
        store,
        params=MfccParams(**params),
        execution=ExecutionParams(workers=workers, device="cpu"),
    )


def test_corpus_has_utterances_of_different_lengths(waveforms: dict[str, torch.Tensor]) -> None:
    lengths = {fileid: w.shape[0] for fileid, w in waveforms.items()}
    assert lengths["p-short"] == 399
    assert lengths["p-exact"] == 400
    assert len({lengths[f"s{i}"] for i in range(len(SENTENCES))}) == len(SENTENCES)
    assert all(lengths[f"s{i}"] > 16_000 for i in range(len(SENTENCES)))


def test_mfcc_equals_the_torchaudio_reference(waveforms: dict[str, torch.Tensor]) -> None:
    for fileid, waveform in waveforms.items():
        if waveform.shape[0] < 400:
            continue
        ours = mfcc(waveform)
        assert ours.shape == (num_frames(waveform.shape[0]), DIM) == (1 + (waveform.shape[0] - 400) // 160, 39), fileid
        torch.testing.assert_close(ours, reference_mfcc(waveform), **TOLERANCE, msg=lambda m, f=fileid: f"{f}: {m}")


def test_an_utterance_of_exactly_one_window_has_one_frame_with_zero_deltas(waveforms: dict[str, torch.Tensor]) -> None:
    features = mfcc(waveforms["p-exact"])
    assert features.shape == (1, 39)
    assert torch.equal(features[:, 13:], torch.zeros(1, 26))


def test_an_utterance_shorter_than_one_window_has_no_frames(waveforms: dict[str, torch.Tensor]) -> None:
    assert mfcc(waveforms["p-short"]).shape == (0, 39)
    assert mfcc(torch.zeros(0)).shape == (0, 39)
    assert [f.shape for f in mfcc_batch([torch.zeros(10), torch.zeros(399)])] == [(0, 39), (0, 39)]


def test_mfcc_batch_equals_the_reference_for_every_utterance_of_the_batch(waveforms: dict[str, torch.Tensor]) -> None:
    order = sorted(waveforms, key=lambda f: (hash(f) % 7, f))  # short pieces between long utterances
    for chunk_rows in (None, 7):  # default chunks, and chunks that cut utterances anywhere
        batch = mfcc_batch([waveforms[f] for f in order], chunk_rows=chunk_rows)
        for fileid, ours in zip(order, batch, strict=True):
            waveform = waveforms[fileid]
            assert ours.shape == (num_frames(waveform.shape[0]), 39), fileid
            if waveform.shape[0] >= 400:
                torch.testing.assert_close(ours, reference_mfcc(waveform), **TOLERANCE)
                torch.testing.assert_close(ours, mfcc(waveform), rtol=1e-5, atol=1e-5)


def test_the_torch_path_for_gpus_equals_the_reference_on_cpu_too(waveforms: dict[str, torch.Tensor]) -> None:
    order = sorted(waveforms)
    for chunk_rows in (65_536, 7):
        batch = mfcc_tensors([waveforms[f] for f in order], torch.device("cpu"), chunk_rows)
        for fileid, ours in zip(order, batch, strict=True):
            waveform = waveforms[fileid]
            assert ours.shape == (num_frames(waveform.shape[0]), 39), fileid
            if waveform.shape[0] >= 400:
                torch.testing.assert_close(ours, reference_mfcc(waveform), **TOLERANCE)


def test_int16_pcm_gives_the_features_of_its_float_waveform(corpus: Path, waveforms: dict[str, torch.Tensor]) -> None:
    rows = list(read_manifest(corpus / "manifest.csv").iter_rows(named=True))
    pcm = [load_samples(source_of(row)) for row in rows]
    assert all(samples.dtype == np.int16 for samples in pcm)
    floats = [waveforms[row["fileid"]] for row in rows]
    for ours, theirs in zip(mfcc_batch(pcm), mfcc_batch(floats), strict=True):
        assert torch.equal(ours, theirs)  # scaling by 2^-15 before or after is exact
    # a batch mixing both (WAV and decoded files in one manifest)
    mixed = [p if i % 2 else f for i, (p, f) in enumerate(zip(pcm, floats, strict=True))]
    for ours, theirs in zip(mfcc_batch(mixed), mfcc_batch(floats), strict=True):
        assert torch.equal(ours, theirs)  # scaling by 2^-15 before or after is exact


def test_mfcc_takes_one_dimensional_waveforms_only() -> None:
    with pytest.raises(ValueError, match=r"expected \(samples,\)"):
        mfcc(torch.zeros(1, 16_000))


def test_mfcc_refuses_integer_samples_other_than_int16_pcm() -> None:
    with pytest.raises(ValueError, match=r"waveform 1 has dtype int32, expected float in \[-1, 1\] or int16 PCM"):
        mfcc_batch([np.zeros(16_000, np.int16), np.zeros(16_000, np.int32)])


def test_store_holds_every_file_of_the_manifest_with_reference_features(
    corpus: Path, waveforms: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    extract(corpus, tmp_path / "store", num_shards=3)
    store = FeatureStore(tmp_path / "store")
    manifest = read_manifest(corpus / "manifest.csv")
    assert sorted(store.fileids) == sorted(manifest["fileid"])
    assert (store.meta.dim, store.meta.dtype, store.meta.frame_rate, store.meta.num_shards) == (39, "float32", 100.0, 3)
    assert (store.meta.stored_dim, store.meta.deltas) == (13, 2)  # Δ and ΔΔ are computed on read
    assert {np.load(shard_path(tmp_path / "store", s), mmap_mode="r").shape[1] for s in range(3)} == {13}
    for row in manifest.iter_rows(named=True):
        features = store.get(row["fileid"])
        assert features.shape == (max(0, 1 + (row["num_samples"] - 400) // 160), 39)
        if row["num_samples"] >= 400:
            expected = reference_mfcc(waveforms[row["fileid"]])
            torch.testing.assert_close(torch.from_numpy(np.array(features)), expected, **TOLERANCE)
            full = mfcc_batch([load_samples(source_of(row))])[0].numpy()  # the file alone, its 39 columns at once
            # the deltas computed on read (from the static columns) equal those computed with the MFCC, bit for bit
            np.testing.assert_array_equal(with_deltas(np.ascontiguousarray(full[:, :NUM_CEPS])), full)
            # the file inside the extraction's batch and alone: equal to float rounding only, as the DCT's matrix
            # product may take another kernel for another number of rows (one ulp on this project's AVX-512 machines)
            np.testing.assert_allclose(features, full, rtol=1e-5, atol=1e-4)


def test_shards_without_files_are_written_empty(corpus: Path, tmp_path: Path) -> None:
    extract(corpus, tmp_path / "store", num_shards=20)
    store = FeatureStore(tmp_path / "store")
    assert len(store) == read_manifest(corpus / "manifest.csv").height
    assert any(np.load(shard_path(tmp_path / "store", s)).shape == (0, 13) for s in range(20))


def test_float16_store_round_trips_within_float16_tolerance(corpus: Path, tmp_path: Path) -> None:
    extract(corpus, tmp_path / "fp32", num_shards=2)
    extract(corpus, tmp_path / "fp16", num_shards=2, dtype="float16")
    fp32, fp16 = FeatureStore(tmp_path / "fp32"), FeatureStore(tmp_path / "fp16")
    assert fp16.meta.dtype == "float16"
    assert np.load(shard_path(tmp_path / "fp16", 0), mmap_mode="r").dtype == np.float16
    for fileid in fp32.fileids:
        full, half = fp32.get(fileid), fp16.get(fileid)
        assert half.dtype == np.float32  # the static coefficients rounded to half precision, then their Δ in float32
        # a Δ is (c[t+1] - c[t-1] + 2 (c[t+2] - c[t-2])) / 10: its error at most 0.6 x the statics' rounding error
        bound = float(np.abs(full[:, :13]).max(initial=0.0)) * 2.0**-11
        np.testing.assert_allclose(half, full, rtol=2.0**-11, atol=bound)


def test_rerun_after_deleting_one_shard_index_recomputes_only_that_shard(corpus: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract(corpus, store, num_shards=3)
    before = {s: shard_path(store, s).read_bytes() for s in range(3)}
    mtimes = {s: shard_path(store, s).stat().st_mtime_ns for s in range(3)}
    shard_index_path(store, 1).unlink()
    extract(corpus, store, num_shards=3)
    assert {s: shard_path(store, s).stat().st_mtime_ns == mtimes[s] for s in range(3)} == {0: True, 1: False, 2: True}
    assert {s: shard_path(store, s).read_bytes() for s in range(3)} == before


def test_a_complete_shard_of_other_settings_is_recomputed(corpus: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract(corpus, store, num_shards=2)
    extract(corpus, store, num_shards=2, dtype="float16")
    assert all(np.load(shard_path(store, s)).dtype == np.float16 for s in range(2))


def test_cli_help_lists_the_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hubert_pipeline.features", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--num-shards NUM_SHARDS" in out
    assert "(default: 8)" in out


def test_two_worker_threads_write_the_same_store_as_one_worker(corpus: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    extract(corpus, tmp_path / "w1", num_shards=3, workers=1)
    extract(corpus, tmp_path / "w2", num_shards=3, workers=2)
    assert torch.get_num_threads() == threads  # the workers' 1 thread each does not stick to the process
    for s in range(3):
        assert shard_path(tmp_path / "w2", s).read_bytes() == shard_path(tmp_path / "w1", s).read_bytes()
        assert shard_index_path(tmp_path / "w2", s).read_text() == shard_index_path(tmp_path / "w1", s).read_text()


def test_an_undecodable_file_fails_the_stage_naming_it_and_seals_nothing(corpus: Path, tmp_path: Path) -> None:
    rows = read_manifest(corpus / "manifest.csv")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF" + bytes(range(256)) * 8)  # a WAV header that is not one
    manifest = tmp_path / "manifest.csv"
    write_csv(pl.concat([rows, pl.DataFrame({"fileid": ["broken"], "path": [str(broken)], "num_samples": [4000]})],
                        how="diagonal"), manifest)  # fmt: skip
    with pytest.raises(TaskError, match=r"broken\.wav: cannot be decoded"):
        extract_mfcc(manifest, tmp_path / "store", params=MfccParams(num_shards=3),
                     execution=ExecutionParams(workers=2, device="cpu"))  # fmt: skip
    assert not (tmp_path / "store" / "meta.json").exists()


@pytest.mark.slow
def test_cli_with_two_workers_writes_the_same_store_as_one_worker(corpus: Path, tmp_path: Path) -> None:
    extract(corpus, tmp_path / "w1", num_shards=3, workers=1)
    subprocess.run(
        [sys.executable, "-m", "hubert_pipeline.features", str(corpus / "manifest.csv"), str(tmp_path / "w2"),
         "--num-shards", "3", "--workers", "2", "--device", "cpu"],
        check=True,
    )  # fmt: skip
    assert FeatureStore(tmp_path / "w2").meta == FeatureStore(tmp_path / "w1").meta
    for s in range(3):
        assert shard_path(tmp_path / "w2", s).read_bytes() == shard_path(tmp_path / "w1", s).read_bytes()
        assert shard_index_path(tmp_path / "w2", s).read_text() == shard_index_path(tmp_path / "w1", s).read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mfcc_batch_on_gpu_equals_the_reference(waveforms: dict[str, torch.Tensor]) -> None:
    order = sorted(waveforms)
    batch = mfcc_batch([waveforms[f] for f in order], device="cuda")
    for fileid, ours in zip(order, batch, strict=True):
        assert ours.device.type == "cuda"
        if waveforms[fileid].shape[0] >= 400:
            torch.testing.assert_close(ours.cpu(), reference_mfcc(waveforms[fileid]), **TOLERANCE)
