"""Resampling and downmix (manifest.resample, manifest.downmix): off, files that are not 16 kHz mono are refused by
name; on, every stage that reads audio reads FFmpeg's 16 kHz mono samples (`ffmpeg -ar 16000 -ac 1`), and the
manifest's num_samples is that length."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from hubert_pipeline.abx import extract_features
from hubert_pipeline.audio import BadAudioError, load_audio, load_samples, source_of
from hubert_pipeline.data import LabeledSpeech, read_labeled_manifest
from hubert_pipeline.features import extract_mfcc, mfcc
from hubert_pipeline.manifest import build_manifest, check_sources, read_manifest, write_csv
from hubert_pipeline.params import ExecutionParams, MfccParams
from hubert_pipeline.store import FeatureStore
from hubert_pipeline.units import merge_units, model_frames

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")

EXTENSIONS = (".wav", ".flac", ".mp3")
# name -> (rate, channels, ffmpeg output options): Common Voice, LibriVox CD rips, telephone, LJSpeech, already fine
FILES = {
    "cv48.mp3": (48_000, 1, ["-c:a", "libmp3lame"]),
    "cd44.flac": (44_100, 2, ["-c:a", "flac"]),
    "tel8.wav": (8_000, 1, ["-c:a", "pcm_mulaw"]),
    "lj22.wav": (22_050, 1, ["-c:a", "pcm_s16le"]),
    "st16.wav": (16_000, 2, ["-c:a", "pcm_s16le"]),
    "ok16.wav": (16_000, 1, ["-c:a", "pcm_s16le"]),
}


def ffmpeg_16k_mono(path) -> torch.Tensor:
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ar", "16000", "-ac", "1",
                          "-f", "f32le", "-"], capture_output=True, check=True).stdout  # fmt: skip
    return torch.from_numpy(np.frombuffer(out, "<f4").copy())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    for i, (name, (rate, channels, options)) in enumerate(FILES.items()):
        seconds = 1.9 + 0.13 * i  # two tones, one per channel (or mixed for mono files)
        tones = [f"sine=frequency={220 + 110 * c + 20 * i}:sample_rate={rate}:duration={seconds}" for c in range(2)]
        pan = "stereo|c0=c0|c1=c1" if channels == 2 else "mono|c0=0.5*c0+0.5*c1"
        inputs = [arg for t in tones for arg in ("-f", "lavfi", "-i", t)]
        cmd = [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            *inputs,
            "-filter_complex",
            f"[0][1]amerge=inputs=2,pan={pan}",
        ]
        subprocess.run([*cmd, *options, str(root / name)], check=True)
    return root


def test_files_that_are_not_16khz_mono_are_refused_by_default_naming_the_key_to_set(mixed):
    with pytest.raises(BadAudioError) as info:
        build_manifest(mixed, extension=EXTENSIONS)
    message = str(info.value)
    assert "5 bad audio file(s)" in message
    assert "cv48.mp3: expected mono 16000 Hz, got 1 channel(s) at 48000 Hz" in message
    assert "cd44.flac: expected mono 16000 Hz, got 2 channel(s) at 44100 Hz" in message
    assert "set manifest.resample: true and manifest.downmix: true" in message
    assert "st16.wav: expected mono 16000 Hz, got 2 channel(s) at 16000 Hz" in message
    assert "(convert the corpus to 16 kHz mono, or set manifest.downmix: true)" in message


def test_downmix_alone_admits_stereo_but_not_other_rates(mixed):
    manifest, skipped = build_manifest(mixed, extension=EXTENSIONS, downmix=True, on_bad_file="skip")
    assert sorted(manifest["fileid"]) == ["ok16", "st16"]
    assert sorted(skipped["fileid"]) == ["cd44", "cv48", "lj22", "tel8"]


@pytest.fixture(scope="module")
def converted(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    manifest, skipped = build_manifest(mixed, extension=EXTENSIONS, resample=True, downmix=True)
    assert skipped.height == 0
    write_csv(manifest, out / "train.csv")
    return out / "train.csv"


def test_manifest_records_each_files_own_format_and_its_converted_length(mixed, converted):
    rows = {r["fileid"]: r for r in read_manifest(converted).to_dicts()}
    for name, (rate, channels, _) in FILES.items():
        row = rows[name.split(".")[0]]
        assert (row["sample_rate"], row["channels"]) == (rate, channels)
        assert row["num_samples"] == ffmpeg_16k_mono(mixed / name).numel(), name
    assert load_samples(source_of(rows["ok16"])).dtype == np.int16  # 16 kHz mono WAV: still read, not decoded
    check_sources(read_manifest(converted), converted)


def test_every_stage_that_reads_audio_reads_ffmpegs_16khz_mono_samples(mixed, converted, tmp_path):
    reference = {name.split(".")[0]: ffmpeg_16k_mono(mixed / name) for name in FILES}
    manifest = read_manifest(converted)
    # data loading for every stage (mfcc, layer features, streamed units): source_of on a manifest row
    for row in manifest.to_dicts():
        torch.testing.assert_close(load_audio(source_of(row)), reference[row["fileid"]], rtol=0, atol=0)
    # training and validation: the manifest with units the units stage writes (JSONL), read by LabeledSpeech
    units = {r["fileid"]: [0] * model_frames(r["num_samples"]) for r in manifest.to_dicts()}
    merge_units(manifest, units, tmp_path / "train.jsonl", step=1, tolerance=0)
    rows = read_labeled_manifest(tmp_path / "train.jsonl")
    dataset = LabeledSpeech(rows, normalize=False)
    for i, row in enumerate(rows):
        torch.testing.assert_close(dataset[(0, i)][1], reference[row["fileid"]], rtol=0, atol=0)
    # the mfcc stage's store
    extract_mfcc(converted, tmp_path / "mfcc", params=MfccParams(num_shards=2), execution=ExecutionParams())
    store = FeatureStore(tmp_path / "mfcc")
    for fileid, waveform in reference.items():
        torch.testing.assert_close(torch.from_numpy(np.array(store.get(fileid))), mfcc(waveform), rtol=1e-5, atol=1e-5)
    # ABX (its audio folder has no manifest: the params' resample and downmix)
    paths = {name.split(".")[0]: mixed / name for name in FILES}
    features = extract_features(None, paths, resample=True, downmix=True)["mfcc"]
    for fileid, waveform in reference.items():
        torch.testing.assert_close(features[fileid], mfcc(waveform), rtol=1e-5, atol=1e-5)


def test_a_manifest_without_format_columns_reads_files_as_they_are(converted):
    row = read_manifest(converted).drop("sample_rate", "channels").filter(pl.col("fileid") == "cv48").to_dicts()[0]
    with pytest.raises(BadAudioError, match=r"cv48\.mp3: expected mono 16000 Hz, got 1 channel\(s\) at 48000 Hz"):
        load_audio(source_of(row))


@pytest.mark.slow
def test_dvc_repro_units_it1_on_a_48khz_mp3_corpus_and_a_44khz_stereo_flac_one_with_resampling(tmp_path):
    import json
    import os

    import yaml

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(repo / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(repo / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "alignments").mkdir(parents=True)
    for split, (rate, channels, extension, options, count) in {
        "train": (48_000, 1, "mp3", ["-c:a", "libmp3lame", "-b:a", "48k"], 12),
        "valid": (44_100, 2, "flac", ["-c:a", "flac"], 3),
    }.items():
        (root / "data" / split).mkdir(parents=True)
        alignments = []
        for i in range(count):
            seconds = 2.5 + 0.1 * i
            tone = f"sine=frequency={150 + 37 * i}:sample_rate={rate}:duration={seconds}"
            noise = f"anoisesrc=color=pink:amplitude=0.1:sample_rate={rate}:duration={seconds}:seed={i}"
            path = root / "data" / split / f"{split}-{i:03d}.{extension}"
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", tone, "-f", "lavfi",
                            "-i", noise, "-filter_complex", "amix=inputs=2", "-ac", str(channels), *options,
                            str(path)], check=True)  # fmt: skip
            phones = [[0.0, seconds / 2, "a"], [seconds / 2, seconds, "b"]]  # data.alignments cannot be empty in DVC
            alignments.append({"fileid": path.stem, "speaker": "s", "phones": phones})
        (root / "data" / "alignments" / f"{split}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alignments))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"] |= {"train": "data/train", "valid": "data/valid", "alignments": "data/alignments"}
    params["manifest"] |= {"extension": [".mp3", ".flac"], "resample": True, "downmix": True}
    params["mfcc"] |= {"num_shards": 2}
    params["kmeans"] |= {"k_it1": 8, "n_init": 1, "fit_fraction": 0.5}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "units_it1"]):
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    train = read_manifest(root / "outputs" / "manifests" / "train.csv")
    valid = read_manifest(root / "outputs" / "manifests" / "valid.csv")
    assert set(train["sample_rate"]) == {48_000}
    assert set(valid["channels"]) == {2}
    for row in [*train.to_dicts(), *valid.to_dicts()]:
        assert row["num_samples"] == ffmpeg_16k_mono(row["path"]).numel()
    units = [json.loads(line) for line in (root / "outputs" / "units" / "it1" / "train.jsonl").read_text().splitlines()]
    assert [len(u["units"]) for u in units] == [model_frames(n) for n in train["num_samples"]]
