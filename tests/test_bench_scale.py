"""bench/scale_corpus.py and bench/bench_scale.py at a tiny size: LibriSpeech's layout, determinism, sane figures."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tone, write_wav

ROOT = Path(__file__).resolve().parents[1]
LIBRISPEECH = re.compile(r"(\d+)/(\d+)/\1-\2-\d{4}\.wav")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    for i in range(4):
        write_wav(folder / f"s{i}.wav", tone(3.0 + i, freq=110.0 + 60 * i, seed=i))
    return folder


def make_corpus(source: Path, out: Path, *args: str) -> dict:
    command = [sys.executable, "bench/scale_corpus.py", str(source), str(out), *args]
    return json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.wav"))}


def test_synthetic_corpus_is_in_librispeech_layout_and_the_same_for_a_seed(source, tmp_path):
    summary = make_corpus(source, tmp_path / "a", "--hours", "0.02", "--valid-hours", "0.005")
    make_corpus(source, tmp_path / "b", "--hours", "0.02", "--valid-hours", "0.005")
    make_corpus(source, tmp_path / "c", "--hours", "0.02", "--valid-hours", "0.005", "--seed", "1")
    train = files_of(tmp_path / "a" / "train")
    assert all(LIBRISPEECH.fullmatch(name) for name in train), list(train)
    assert len(train) == summary["train"]["files"] >= 5
    assert 0.02 <= summary["train"]["hours"] < 0.02 + 15 / 3600
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert files_of(tmp_path / "c" / "train") != train
    valid_ids = {Path(n).stem for n in files_of(tmp_path / "a" / "valid")}
    assert valid_ids
    assert not valid_ids & {Path(n).stem for n in train}


def test_a_killed_generation_resumes_with_the_same_files(source, tmp_path):
    make_corpus(source, tmp_path / "a", "--hours", "0.01", "--valid-hours", "0.002")
    first = files_of(tmp_path / "a")
    removed = max((tmp_path / "a" / "train").rglob("*.wav"))
    removed.unlink()
    summary = make_corpus(source, tmp_path / "a", "--hours", "0.01", "--valid-hours", "0.002")
    assert summary["train"]["written"] == 1
    assert files_of(tmp_path / "a") == first


@pytest.mark.slow
def test_benchmark_at_a_tiny_size_writes_positive_figures_and_the_tables(source, tmp_path):
    results, doc = tmp_path / "results.json", tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nbefore\n<!-- bench_scale:begin -->\nold\n<!-- bench_scale:end -->\nafter\n")
    command = [sys.executable, "bench/bench_scale.py", "--hours", "0.01", "0.02", "--steps", "2",
               "--valid-hours", "0.003", "--source", str(source), "--work", str(tmp_path / "work"),
               "--results", str(results), "--doc", str(doc)]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    figures = json.loads(results.read_text())
    assert list(figures) == ["0.01h", "0.02h"]
    for size in figures.values():
        assert size["train_files"] >= 3
        assert size["train_hours"] >= 0.01
        for stage in ("manifest", "mfcc", "kmeans_it1", "units_it1", "pretrain_it1"):
            s = size["stages"][stage]
            assert 0 < s["command"]["wall_s"] < s["dvc_repro"]["wall_s"]
            assert s["command"]["cpu_s"] > 0
            assert s["command"]["peak_rss_gb"] > 0.01
            assert s["disk_written_gb"] > 0
            assert s["dvc_status"]["wall_s"] > 0
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n<!-- bench_scale:begin -->")
    assert text.endswith("<!-- bench_scale:end -->\nafter\n")
    assert "old" not in text
    for heading in ("**mfcc**", "Growth from 0.01h to 0.02h", "LibriSpeech 960 h"):
        assert heading in text
    again = subprocess.run([*command[:2], "--report-only", "--results", str(results), "--doc", str(doc)],
                           cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    assert doc.read_text() == text
    assert "**pretrain_it1**" in again.stdout
