"""Convert once: a 48 kHz MP3 corpus (Common Voice's format) converted to 16 kHz mono files has the ids, lengths
and samples that the manifest with resampling reads from the original, keeps its sub-folders, and resumes."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest
import torch

import hubert_pipeline
from hubert_pipeline.audio import load_audio, source_of
from hubert_pipeline.manifest import build_manifest
from hubert_pipeline.params import ExecutionParams
from hubert_pipeline.transcode import CODE_STAMP, convert_corpus

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")

TWO = ExecutionParams(workers=2)
FILES = ("spk1/a_1", "spk1/a_2", "spk2/b_1", "spk2/deeper/b.2")  # sub-folders kept; an id with a dot


@pytest.fixture(scope="module")
def mp3_48k(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv") / "train"
    for i, name in enumerate(FILES):
        path = root / f"{name}.mp3"
        path.parent.mkdir(parents=True, exist_ok=True)
        tone = f"sine=frequency={200 + 70 * i}:sample_rate=48000:duration={1.1 + 0.2 * i}"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", tone, "-ac", "1",
                        "-c:a", "libmp3lame", str(path)], check=True)  # fmt: skip
    return root


def samples_by_id(manifest: pl.DataFrame) -> dict[str, torch.Tensor]:
    return {row["fileid"]: load_audio(source_of(row)) for row in manifest.iter_rows(named=True)}


@pytest.mark.parametrize(("fmt", "extension", "atol"), [("wav", ".wav", 0.0), ("flac", ".flac", 2**-23),
                                                        ("wav16", ".wav", 2**-16)])  # fmt: skip
def test_converted_corpus_reads_as_the_resampled_original(mp3_48k, tmp_path, fmt, extension, atol):
    report = convert_corpus(mp3_48k, tmp_path / "out", extensions=(".mp3",), fmt=fmt, execution=TWO)
    assert (report.converted, report.skipped) == (len(FILES), 0)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*")) == sorted(
        [f"{name}{extension}" for name in FILES] + [CODE_STAMP]
    )
    original, _ = build_manifest(mp3_48k, extension=".mp3", resample=True)
    converted, _ = build_manifest(tmp_path / "out", extension=extension)  # 16 kHz mono: no resampling needed
    assert converted["fileid"].to_list() == original["fileid"].to_list()
    assert converted["num_samples"].to_list() == original["num_samples"].to_list()
    assert report.seconds == pytest.approx(original["num_samples"].sum() / 16_000)
    expected, got = samples_by_id(original), samples_by_id(converted)
    for fileid, samples in expected.items():
        torch.testing.assert_close(got[fileid], samples, atol=atol, rtol=0)


def test_a_rerun_skips_converted_files_and_redoes_changed_or_half_written_ones(mp3_48k, tmp_path):
    corpus = tmp_path / "train"
    shutil.copytree(mp3_48k, corpus)
    out = tmp_path / "out"
    convert_corpus(corpus, out, extensions=(".mp3",), fmt="flac", execution=TWO)
    (out / "spk1" / ".a_1.flac.1234.tmp").write_bytes(b"half")  # a write killed before its rename
    (out / "spk1" / "a_2.wav").write_bytes(b"old")  # another format's file
    changed = corpus / "spk2" / "b_1.mp3"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    report = convert_corpus(corpus, out, extensions=(".mp3",), fmt="flac", execution=TWO)
    assert (report.converted, report.skipped) == (1, len(FILES) - 1)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a_1.flac", "a_2.flac", "b.2.flac", "b_1.flac",
                                                                     CODE_STAMP]  # fmt: skip


def test_a_rerun_by_other_conversion_code_converts_every_file_again(mp3_48k, tmp_path):
    """DVC reruns the convert stage when its code changed; the files the old code wrote must not be kept."""
    code = tmp_path / "code"
    shutil.copytree(Path(hubert_pipeline.__file__).parent, code / "hubert_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "hubert_pipeline.transcode", str(mp3_48k), str(tmp_path / "out")]

    def convert() -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=True)

    assert f"{len(FILES)} files converted" in convert().stdout
    assert f"0 files converted (0.00 h), {len(FILES)} already converted" in convert().stdout  # the same code
    with (code / "hubert_pipeline" / "audio.py").open("a") as f:
        f.write("# an edit: the conversion code is not the one that wrote the files\n")
    again = convert()
    assert f"{len(FILES)} files converted" in again.stdout
    assert "converted by other code (changed: audio.py), are converted again" in again.stderr


def test_a_tar_corpus_converts_with_its_member_folders(mp3_48k, tmp_path):
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(mp3_48k, arcname="clips")
    convert_corpus(archive, tmp_path / "out", extensions=(".mp3",), fmt="wav16", execution=TWO)
    assert (tmp_path / "out" / "clips" / "spk2" / "deeper" / "b.2.wav").is_file()


@pytest.mark.slow
def test_the_readme_command_turns_conversion_on_and_the_manifest_reads_the_converted_corpus(mp3_48k, tmp_path):
    from test_experiments import TINY, git, reduced_project, run

    root = reduced_project(tmp_path / "p", ("convert", "manifest"), TINY, files=0)
    assert run(["dvc", "stage", "list", "--name-only"], root).stdout.split() == ["manifest"]  # off by default
    shutil.copytree(mp3_48k, root / "cv" / "train")
    shutil.copytree(mp3_48k / "spk1", root / "cv" / "valid" / "spk9")
    for path in (root / "cv" / "valid").rglob("*.mp3"):
        path.rename(path.with_name(f"v{path.name}"))  # valid ids apart from train's
    git(root, "add", "-A")
    git(root, "commit", "-qm", "mp3 corpus")
    out = run(["dvc", "exp", "run", "-S", "++convert.corpora={train: cv/train, valid: cv/valid}",
               "-S", "data.train=outputs/converted/train", "-S", "data.valid=outputs/converted/valid",
               "-S", "manifest.extension=.flac"], root).stdout  # fmt: skip
    assert "Running stage 'convert@train'" in out
    assert "Running stage 'convert@valid'" in out
    train = pl.read_csv(root / "outputs" / "manifests" / "train.csv")
    original, _ = build_manifest(mp3_48k, extension=".mp3", resample=True)
    assert train["fileid"].to_list() == original["fileid"].to_list()
    assert train["num_samples"].to_list() == original["num_samples"].to_list()
    assert pl.read_csv(root / "outputs" / "manifests" / "valid.csv")["fileid"].to_list() == ["va_1", "va_2"]


def test_the_cli_converts_a_corpus_and_says_how_much(mp3_48k, tmp_path):
    cmd = [sys.executable, "-m", "hubert_pipeline.transcode", str(mp3_48k), str(tmp_path / "out"),
           "--extension", ".mp3", "--format", "wav16", "--workers", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"{len(FILES)} files converted (")
    assert len(list((tmp_path / "out").rglob("*.wav"))) == len(FILES)
