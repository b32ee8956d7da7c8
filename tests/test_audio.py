import tarfile

import numpy as np
import pytest
import torch
from conftest import tone, write_wav

from hubert_pipeline.audio import (
    AudioSource,
    BadAudioError,
    build_manifest,
    discover,
    file_id,
    load_audio,
    read_manifest,
    source_of,
    write_csv,
)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    write_wav(root / "spk1" / "a-001.wav", tone(1.0))
    write_wav(root / "spk1" / "a-002.wav", tone(0.5, freq=330))
    write_wav(root / "spk2" / "b-001.wav", tone(2.0, freq=440))
    return root


def add_bad_files(root):
    write_wav(root / "bad" / "stereo.wav", np.stack([tone(1.0), tone(1.0)], axis=1))
    write_wav(root / "bad" / "narrow.wav", tone(1.0, sample_rate=8000), sample_rate=8000)
    (root / "bad" / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    write_wav(root / "bad" / "empty.wav", np.zeros(0))


def test_file_id_is_the_name_without_extension_wherever_the_file_is():
    assert file_id("/data/LibriSpeech/train/19/198/19-198-0001.flac") == "19-198-0001"
    assert file_id("19/198/19-198-0001.flac") == "19-198-0001"
    assert file_id("x.tar.member.wav") == "x.tar.member"


def test_manifest_lists_every_file_sorted_with_exact_sample_counts(corpus):
    manifest, skipped = build_manifest(corpus)
    assert manifest["fileid"].to_list() == ["a-001", "a-002", "b-001"]
    assert manifest["num_samples"].to_list() == [16000, 8000, 32000]
    assert skipped.height == 0


def test_corrupt_stereo_8khz_and_empty_files_are_reported_by_name(corpus):
    add_bad_files(corpus)
    with pytest.raises(BadAudioError) as info:
        build_manifest(corpus)
    message = str(info.value)
    assert "4 bad audio file(s)" in message
    for name in ("stereo.wav", "narrow.wav", "corrupt.wav", "empty.wav"):
        assert name in message
    assert "8000 Hz" in message
    assert "2 channels" in message


def test_skip_policy_leaves_bad_files_out_and_lists_them(corpus):
    add_bad_files(corpus)
    manifest, skipped = build_manifest(corpus, on_bad_file="skip")
    assert manifest["fileid"].to_list() == ["a-001", "a-002", "b-001"]
    assert sorted(skipped["fileid"].to_list()) == ["corrupt", "empty", "narrow", "stereo"]
    assert all(skipped["reason"].str.contains(r"\.wav"))


def test_duplicate_file_ids_are_an_error_naming_both_files(corpus):
    write_wav(corpus / "other" / "a-001.wav", tone(1.0))
    with pytest.raises(ValueError, match=r"'a-001' is given by both .*other/a-001.wav and .*spk1/a-001.wav"):
        build_manifest(corpus)


def test_uncompressed_tar_archive_gives_the_same_audio_as_the_folder(corpus, tmp_path):
    archive = tmp_path / "corpus.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(corpus, arcname="corpus")
    from_dir, _ = build_manifest(corpus)
    from_tar, _ = build_manifest(archive)
    assert from_tar["fileid"].to_list() == from_dir["fileid"].to_list()
    assert from_tar["num_samples"].to_list() == from_dir["num_samples"].to_list()
    assert {"archive", "byte_offset", "byte_size"} <= set(from_tar.columns)
    for row_dir, row_tar in zip(from_dir.iter_rows(named=True), from_tar.iter_rows(named=True), strict=True):
        torch.testing.assert_close(load_audio(source_of(row_tar)), load_audio(source_of(row_dir)))


def test_compressed_archive_is_refused(corpus, tmp_path):
    archive = tmp_path / "corpus.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(corpus, arcname="corpus")
    with pytest.raises((ValueError, tarfile.ReadError)):
        build_manifest(archive)


def test_missing_corpus_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_manifest(tmp_path / "nowhere")


def test_manifest_round_trips_through_csv_and_is_readable_by_spidr(corpus, tmp_path):
    from spidr.data.dataset import speech_dataset

    manifest, _ = build_manifest(corpus)
    write_csv(manifest, tmp_path / "train.csv")
    assert read_manifest(tmp_path / "train.csv").equals(manifest)
    dataset = speech_dataset(tmp_path / "train.csv", normalize=False)
    assert len(dataset) == 3
    assert dataset[2].shape == (32000,)


def test_pcm_wav_fast_path_gives_the_decoders_samples_for_files_and_tar_members(tmp_path):
    from hubert_pipeline.audio import _decoder, _pcm_wav

    samples = np.concatenate([tone(0.5, seed=3), [1.0, -1.0, 0.0, 0.999]])  # with full-scale samples
    path = write_wav(tmp_path / "a.wav", samples)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(path, arcname="x/a.wav")
    (_, tar_source), *_ = list(discover(tmp_path / "a.tar", ".wav"))
    for source in (AudioSource(str(path)), tar_source):
        assert _pcm_wav(source) is not None  # the fast path is taken
        fast = load_audio(source)
        assert torch.equal(fast, _decoder(source).get_all_samples().data[0])
        assert fast.dtype == torch.float32
        assert fast.abs().max() <= 1.0


def test_pcm_wav_fast_path_checks_rate_and_channels_and_leaves_other_files_to_the_decoder(tmp_path):
    from hubert_pipeline.audio import _pcm_wav

    with pytest.raises(BadAudioError, match=r"stereo\.wav.*2 channel\(s\) at 16000 Hz"):
        load_audio(AudioSource(str(write_wav(tmp_path / "stereo.wav", np.stack([tone(0.2)] * 2, axis=1)))))
    with pytest.raises(BadAudioError, match=r"low\.wav.*1 channel\(s\) at 8000 Hz"):
        load_audio(AudioSource(str(write_wav(tmp_path / "low.wav", tone(0.2, 8000), 8000))))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(write_wav(tmp_path / "full.wav", tone(0.2)).read_bytes()[:-100])
    assert _pcm_wav(AudioSource(str(truncated))) is None  # the decoder decides
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    assert _pcm_wav(AudioSource(str(tmp_path / "junk.wav"))) is None
