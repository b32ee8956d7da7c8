import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from conftest import tone, write_wav

from hubert_pipeline.audio import BadAudioError, file_id, load_audio, source_of
from hubert_pipeline.manifest import (
    build_manifest,
    check_sources,
    check_splits_apart,
    discover_all,
    read_checked_manifest,
    read_manifest,
    short_files,
    write_csv,
    write_manifest,
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
    (root / "bad" / "truncated.wav").write_bytes((root / "spk2" / "b-001.wav").read_bytes()[:-1000])


def test_file_id_is_the_name_without_extension_wherever_the_file_is():
    assert file_id("/data/LibriSpeech/train/19/198/19-198-0001.flac") == "19-198-0001"
    assert file_id("19/198/19-198-0001.flac") == "19-198-0001"
    assert file_id("x.tar.member.wav") == "x.tar.member"


def test_manifest_lists_every_file_sorted_with_exact_sample_counts(corpus):
    manifest, skipped = build_manifest(corpus)
    assert manifest["fileid"].to_list() == ["a-001", "a-002", "b-001"]
    assert manifest["num_samples"].to_list() == [16000, 8000, 32000]
    assert skipped.height == 0


def test_corrupt_truncated_stereo_8khz_and_empty_files_are_reported_by_name(corpus):
    add_bad_files(corpus)
    with pytest.raises(BadAudioError) as info:
        build_manifest(corpus)
    message = str(info.value)
    assert "5 bad audio file(s)" in message
    for name in ("stereo.wav", "narrow.wav", "corrupt.wav", "empty.wav", "truncated.wav: WAV truncated"):
        assert name in message
    assert "8000 Hz" in message
    assert "2 channel(s)" in message


def test_skip_policy_leaves_bad_files_out_and_lists_them_with_their_reason(corpus, tmp_path):
    add_bad_files(corpus)
    manifest, skipped = build_manifest(corpus, on_bad_file="skip")
    assert manifest["fileid"].to_list() == ["a-001", "a-002", "b-001"]
    assert sorted(skipped["fileid"].to_list()) == ["corrupt", "empty", "narrow", "stereo", "truncated"]
    reasons = dict(zip(skipped["fileid"], skipped["reason"], strict=True))
    assert "truncated: its header says 64000 bytes of audio, the file holds 63000" in reasons["truncated"]
    write_csv(skipped, tmp_path / "skipped.csv")
    assert read_manifest_columns(tmp_path / "skipped.csv") == ["fileid", "path", "reason"]


def read_manifest_columns(path):
    return path.read_text().splitlines()[0].split(",")


def test_duplicate_file_ids_are_an_error_naming_both_files(corpus):
    write_wav(corpus / "other" / "a-001.wav", tone(1.0))
    with pytest.raises(ValueError, match=r"'a-001' is given by both .*other/a-001.wav and .*spk1/a-001.wav"):
        build_manifest(corpus)


def test_several_extensions_make_one_corpus(corpus):
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(corpus / "spk2" / "b-001.wav"),
                    str(corpus / "spk2" / "c-001.flac")], check=True)  # fmt: skip
    manifest, _ = build_manifest(corpus, extension=[".wav", ".flac"])
    assert manifest["fileid"].to_list() == ["a-001", "a-002", "b-001", "c-001"]
    flac, wav = (source_of(r) for r in manifest.filter(manifest["fileid"].is_in(["c-001", "b-001"])).to_dicts()[::-1])
    torch.testing.assert_close(load_audio(flac), load_audio(wav))
    assert build_manifest(corpus, extension=".flac")[0]["fileid"].to_list() == ["c-001"]


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


def test_empty_folder_or_one_of_other_files_is_named_with_what_it_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \.wav files found \(manifest\.extension\); it holds: nothing"):
        discover_all(tmp_path / "empty", ".wav")
    for i in range(3):
        (tmp_path / "flacs" / f"{i}.flac").parent.mkdir(exist_ok=True)
        (tmp_path / "flacs" / f"{i}.flac").write_bytes(b"")
    with pytest.raises(ValueError, match=r"flacs: no \.wav/\.mp3 files found .*it holds: 3 \.flac"):
        discover_all(tmp_path / "flacs", [".wav", ".mp3"])


def test_train_and_valid_overlapping_are_refused_before_probing(corpus, tmp_path):
    found = {"train": discover_all(corpus, ".wav"), "valid": discover_all(corpus / "spk1", ".wav")}
    with pytest.raises(ValueError, match=r"data\.train \(.*corpus\) and data\.valid \(.*spk1\) overlap: one is inside"):
        check_splits_apart({"train": corpus, "valid": corpus / "spk1"}, found)
    copy = tmp_path / "copy"
    shutil.copytree(corpus / "spk2", copy)
    found["valid"] = discover_all(copy, ".wav")
    with pytest.raises(ValueError, match=r"overlap: 1 file id\(s\) are in both, e\.g\. \['b-001'\]"):
        check_splits_apart({"train": corpus, "valid": copy}, found)


def test_manifest_round_trips_through_csv_and_is_readable_by_spidr(corpus, tmp_path):
    from spidr.data.dataset import speech_dataset

    manifest, _ = build_manifest(corpus)
    write_csv(manifest, tmp_path / "train.csv")
    assert read_manifest(tmp_path / "train.csv").equals(manifest)
    dataset = speech_dataset(tmp_path / "train.csv", normalize=False)
    assert len(dataset) == 3
    assert dataset[2].shape == (32000,)


def test_files_shorter_than_min_sample_size_are_listed(corpus):
    manifest, _ = build_manifest(corpus)
    assert short_files(manifest, 16_001)["fileid"].to_list() == ["a-001", "a-002"]


def test_files_moved_or_changed_since_probing_are_named_before_any_work(corpus):
    manifest, _ = build_manifest(corpus)
    check_sources(manifest, "train.csv")  # unchanged
    path = corpus / "spk1" / "a-001.wav"
    os.utime(path, ns=(0, 0))  # touched (as dvc checkout does), same bytes: accepted
    check_sources(manifest, "train.csv")
    write_wav(path, tone(1.0, freq=500))  # same size and length, new content: accepted (length is what counts)
    check_sources(manifest, "train.csv")
    write_wav(path, tone(1.5))
    (corpus / "spk2" / "b-001.wav").rename(corpus / "moved.wav")
    with pytest.raises(ValueError, match=r"train\.csv: 2 file\(s\) moved or changed") as info:
        check_sources(manifest, "train.csv")
    assert "b-001.wav: no longer exists" in str(info.value)
    assert "a-001.wav: 48044 bytes, 32044 when probed" in str(info.value)


def test_file_changed_in_place_keeping_its_size_but_not_its_length_is_named(corpus):
    manifest, _ = build_manifest(corpus)
    path = corpus / "spk1" / "a-001.wav"
    data = bytearray(path.read_bytes())
    data[40:44] = (16000).to_bytes(4, "little")  # data chunk now claims half: same size, new length
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))
    with pytest.raises(ValueError, match=r"a-001\.wav: modified since probed: 8000 samples, 16000 in the manifest"):
        check_sources(manifest, "train.csv")


REPO = Path(__file__).resolve().parents[1]


def run_manifest_stage(tmp_path, train, valid, manifest_params):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"manifest": manifest_params}))
    cmd = [sys.executable, str(REPO / "stages" / "manifest.py"), str(train), str(valid), str(tmp_path / "out"),
           "--params", str(params)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)


def test_manifest_stage_takes_several_formats_and_lists_skipped_files_with_reasons(corpus, tmp_path, isolated_mlflow):
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(corpus / "spk2" / "b-001.wav"),
                    str(corpus / "spk2" / "c-001.flac")], check=True)  # fmt: skip
    (corpus / "spk2" / "bad.flac").write_bytes((corpus / "spk2" / "c-001.flac").read_bytes()[:-300])
    valid = tmp_path / "valid"
    write_wav(valid / "v-001.wav", tone(1.0))
    result = run_manifest_stage(tmp_path, corpus, valid, {"extension": [".wav", ".flac"], "on_bad_file": "skip"})
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "out" / "train.csv")["fileid"].to_list() == ["a-001", "a-002", "b-001", "c-001"]
    skipped = pl.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["fileid"].to_list() == ["bad"]
    assert skipped["split"].to_list() == ["train"]
    assert "FLAC its last frame is cut short" in skipped["reason"][0]


def test_manifest_stage_refuses_overlapping_splits_and_unknown_extensions_naming_them(
    corpus, tmp_path, isolated_mlflow
):
    result = run_manifest_stage(tmp_path, corpus, corpus / "spk1", {})
    assert result.returncode != 0
    assert "data.train" in result.stderr
    assert "overlap: one is inside the other" in result.stderr
    result = run_manifest_stage(tmp_path, corpus, tmp_path / "valid", {"extension": [".wav", ".txt"]})
    assert result.returncode != 0
    assert "manifest.extension '.txt' is not an audio extension" in result.stderr
    assert not (tmp_path / "out").exists()


def test_mfcc_stage_names_files_moved_since_the_manifest_stage_before_any_work(corpus, tmp_path, isolated_mlflow):
    valid = tmp_path / "valid"
    write_wav(valid / "v-001.wav", tone(1.0))
    assert run_manifest_stage(tmp_path, corpus, valid, {}).returncode == 0
    (corpus / "spk1" / "a-002.wav").rename(tmp_path / "a-002.wav")
    params = tmp_path / "params.yaml"
    cmd = [sys.executable, str(REPO / "stages" / "mfcc.py"), str(tmp_path / "out"), str(tmp_path / "mfcc"),
           "--params", str(params)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert result.returncode != 0
    assert "train.csv: 1 file(s) moved or changed since the manifest stage probed them" in result.stderr
    assert "a-002.wav: no longer exists" in result.stderr
    assert not (tmp_path / "mfcc").exists()


def test_a_fairseq_tsv_listing_gives_the_manifest_of_its_folder(corpus, tmp_path, isolated_mlflow):
    relative = sorted(p.relative_to(corpus) for p in corpus.rglob("*.wav"))
    listing = tmp_path / "train.tsv"  # fairseq's format: the folder, then `path<TAB>num_samples` (any order)
    listing.write_text(f"{corpus}\n" + "".join(f"{r}\t123\n" for r in reversed(relative)))
    from_dir, _ = build_manifest(corpus)
    from_tsv, _ = build_manifest(listing)
    assert from_tsv.equals(from_dir)  # ids, paths, probed lengths and file stats
    valid = tmp_path / "valid"
    write_wav(valid / "v-001.wav", tone(1.0))
    result = run_manifest_stage(tmp_path, listing, valid, {})
    assert result.returncode == 0, result.stderr
    columns = ["fileid", "path", "num_samples", "file_size", "file_mtime_ns"]
    assert read_manifest(tmp_path / "out" / "train.csv").select(columns).equals(from_dir.select(columns))


def test_a_listing_of_missing_files_other_extensions_or_no_files_is_refused_naming_them(corpus, tmp_path):
    listing = tmp_path / "train.tsv"
    listing.write_text(f"{corpus}\nspk1/a-001.wav\t16000\nspk1/gone.wav\t16000\n")
    with pytest.raises(BadAudioError, match=r"gone\.wav: cannot be read"):
        build_manifest(listing)
    listing.write_text(f"{corpus}\nspk1/a-001.wav\nnotes.txt\n")
    with pytest.raises(ValueError, match=r"train\.tsv: 1 listed file\(s\) are not \.wav .*notes\.txt"):
        build_manifest(listing)
    listing.write_text(f"{corpus}\n")
    with pytest.raises(ValueError, match=r"train\.tsv: lists no files"):
        build_manifest(listing)


def test_a_pipelines_manifest_names_its_files_relative_to_it_and_still_reads_them_after_the_project_moves(tmp_path):
    """A manifest restored by DVC's run cache into a `dvc exp run --temp` copy, or a project moved or cloned elsewhere,
    names the same files there: inside the project relative to its folder (dvc.yaml's), outside it absolute."""
    from hubert_pipeline.data import read_labeled_manifest
    from hubert_pipeline.units import merge_units

    project, outside = tmp_path / "project", tmp_path / "corpora" / "other"
    (project / "dvc.yaml").parent.mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    write_wav(project / "data" / "spk1" / "a-001.wav", tone(1.0))
    write_wav(outside / "b-001.wav", tone(0.5, freq=330))
    with tarfile.open(project / "data.tar", "w") as tar:
        tar.add(project / "data" / "spk1" / "a-001.wav", arcname="t/c-001.wav")
    manifest = pl.concat([build_manifest(project / "data")[0], build_manifest(outside)[0]])
    write_manifest(manifest, project / "out" / "train.csv")
    write_manifest(build_manifest(project / "data.tar")[0], project / "out" / "tar.csv")
    written = pl.read_csv(project / "out" / "train.csv")["path"].to_list()
    assert written == ["data/spk1/a-001.wav", str((outside / "b-001.wav").resolve())]
    tar_row = pl.read_csv(project / "out" / "tar.csv").row(0, named=True)
    assert (tar_row["archive"], tar_row["path"]) == ("data.tar", "t/c-001.wav")
    merge_units(read_manifest(project / "out" / "train.csv"), {"a-001": [1] * 49, "b-001": [2] * 24},
                project / "out" / "train.jsonl", step=1, tolerance=1)  # fmt: skip
    assert '"path":"data/spk1/a-001.wav"' in (project / "out" / "train.jsonl").read_text()

    moved = tmp_path / "moved" / "project"  # the run cache's copy elsewhere: the files there, not the old ones
    moved.parent.mkdir()
    project.rename(moved)
    (rows, _), tar = (
        read_checked_manifest(moved / "out" / "train.csv").to_dicts(),
        read_checked_manifest(moved / "out" / "tar.csv"),
    )
    assert rows["path"] == str(moved / "data/spk1/a-001.wav")
    assert tar["archive"].to_list() == [str(moved / "data.tar")]
    for row in [rows, *tar.to_dicts()]:
        assert load_audio(source_of(row)).numel() == row["num_samples"] == 16_000
    labeled = read_labeled_manifest(moved / "out" / "train.jsonl")
    assert [r["path"] for r in labeled] == [str(moved / "data/spk1/a-001.wav"), str((outside / "b-001.wav").resolve())]
    assert read_manifest(moved / "out" / "train.csv", resolve=False)["path"][0] == "data/spk1/a-001.wav"
