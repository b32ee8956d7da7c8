import ctypes
import itertools
import json
import math
import re
import wave
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchaudio.functional import resample

from hubert_pipeline.demo import (
    ABX_HEADER,
    Job,
    Speaker,
    run_synthesizer,
    synthesize_demo,
)
from hubert_pipeline.demo_text import SPLITS
from hubert_pipeline.espeak import VOICES as ESPEAK_VOICES
from hubert_pipeline.espeak import phone_ends, run_jobs
from hubert_pipeline.params import DemoParams

# 3 Festival voices (slt's HTS writes 32 kHz) and an eSpeak NG one (22.05 kHz) x 2 speeds (one up, one down):
# 8 speakers, so 8 files at least per split
PARAMS = DemoParams(
    seed=3,
    train_minutes=0.2,
    valid_minutes=0.2,
    abx_minutes=0.2,
    voices=("kal", "ked", "slt", "espeak-f2"),
    speeds=(0.9, 1.12),
)
SPEAKERS = {f"{voice}-s{round(speed * 100):03d}" for voice in PARAMS.voices for speed in PARAMS.speeds}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    synthesize_demo(out, PARAMS, workers=1)
    return out


def read_alignments(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / "alignments" / f"{split}.jsonl").read_text().splitlines()]


def wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


@pytest.mark.slow
def test_every_file_is_16_khz_mono_16_bit_pcm(demo):
    paths = sorted((demo / "wav").rglob("*.wav"))
    assert len(paths) >= 3 * len(SPEAKERS)
    for path in paths:
        with wave.open(str(path), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
            assert w.getnframes() > 16_000


@pytest.mark.slow
def test_alignments_cover_each_file_from_zero_to_its_end(demo):
    for split in SPLITS:
        records = read_alignments(demo, split)
        assert [r["fileid"] for r in records] == sorted(r["fileid"] for r in records)
        assert {p.stem for p in (demo / "wav" / split).rglob("*.wav")} == {r["fileid"] for r in records}
        for record in records:
            path = demo / "wav" / split / record["speaker"] / f"{record['fileid']}.wav"
            phones = record["phones"]
            assert phones[0][0] == 0
            assert abs(phones[-1][1] - wav_duration(path)) < 0.02
            assert all(onset < offset for onset, offset, _ in phones)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(phones))
            assert any(phone != "pau" for _, _, phone in phones)


@pytest.mark.slow
def test_every_speaker_appears_in_every_split_and_splits_reach_their_minutes(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["speakers"]) == SPEAKERS
    for split in SPLITS:
        assert {r["speaker"] for r in read_alignments(demo, split)} == SPEAKERS
        assert {p.name for p in (demo / "wav" / split).iterdir()} == SPEAKERS
        assert summary["splits"][split]["minutes"] >= 0.2
        assert summary["splits"][split]["files"] == len(read_alignments(demo, split))


@pytest.mark.slow
def test_fileids_are_globally_unique_and_name_speaker_and_split(demo):
    fileids = [r["fileid"] for split in SPLITS for r in read_alignments(demo, split)]
    assert len(fileids) == len(set(fileids))
    for split in SPLITS:
        for record in read_alignments(demo, split):
            speaker, file_split, index = record["fileid"].split("_")
            assert (speaker, file_split, len(index)) == (record["speaker"], split, 5)


@pytest.mark.slow
def test_abx_item_lists_the_non_silent_phones_of_abx_files(demo):
    header, *lines = (demo / "abx.item").read_text().splitlines()
    assert header == ABX_HEADER
    assert lines
    files = {p.stem for p in (demo / "wav" / "abx").rglob("*.wav")}
    phones = {(r["fileid"], onset, offset, p) for r in read_alignments(demo, "abx") for onset, offset, p in r["phones"]}
    for line in lines:
        fileid, onset, offset, phone, prev, nxt, speaker = line.split(" ")
        assert fileid in files
        assert fileid.startswith(f"{speaker}_abx_")
        assert (fileid, float(onset), float(offset), phone) in phones
        assert "pau" not in (phone, prev, nxt)
    assert {line.split(" ")[6] for line in lines} == SPEAKERS


@pytest.mark.slow
def test_rerun_with_more_workers_writes_byte_identical_files(demo, tmp_path):
    synthesize_demo(tmp_path, PARAMS, workers=2)
    ours = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert ours == theirs
    for path in ours:
        assert (demo / path).read_bytes() == (tmp_path / path).read_bytes(), path


def test_unknown_voice_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape("['bob']; known voices are ['espeak-f1', 'espeak-f2'")):
        synthesize_demo(tmp_path, DemoParams(voices=("kal", "bob")))


def test_missing_text_file_raises_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        synthesize_demo(tmp_path, DemoParams(text=str(missing)))


def test_speed_resampling_keeps_length_ratio_and_scales_a_tone():
    t = torch.arange(32_000) / 32_000
    x = torch.sin(2 * math.pi * 440 * t)
    y = resample(x, 28_800, 16_000)  # 32 kHz audio at speed 0.9: a 440 Hz tone becomes 396 Hz
    assert y.numel() == math.ceil(32_000 * 16_000 / 28_800)
    spectrum = torch.fft.rfft(y[4000:-4000] * torch.hann_window(y.numel() - 8000)).abs()
    peak_hz = spectrum.argmax().item() * 16_000 / (y.numel() - 8000)
    assert abs(peak_hz - 396) < 3


@pytest.mark.slow
def test_a_short_text_is_read_again_by_other_speakers_and_a_smaller_rerun_removes_stale_files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps.\n\nA second, rather short sentence here.\n\nThird one: the end.\n")
    params = DemoParams(train_minutes=0.3, valid_minutes=0.05, abx_minutes=0.05, voices=("kal",), speeds=(1.0, 1.1))
    synthesize_demo(tmp_path / "out", replace(params, text=str(text), train_minutes=0.5))
    summary = synthesize_demo(tmp_path / "out", replace(params, text=str(text)))
    train = read_alignments(tmp_path / "out", "train")
    assert summary["splits"]["train"]["minutes"] >= 0.3
    assert len({tuple(phone for _, _, phone in r["phones"]) for r in train}) == 1  # one utterance, read again
    assert {r["speaker"] for r in train} == {"kal-s100", "kal-s110"}
    assert len(list((tmp_path / "out" / "wav" / "train").rglob("*.wav"))) == len(train)


def _espeak(texts: list[str], folder: Path) -> dict[str, tuple[bytes, list[str]]]:
    jobs = [Job("train", k, text, Speaker("espeak-f2", 1.0)) for k, text in enumerate(texts)]
    folder.mkdir()
    results = run_synthesizer("espeak-f2", jobs, folder)
    for s in results:  # silence after the last phone, as Festival's diphone voices: ABX items need frames after it
        assert s.ends[-1] == ("pau", pytest.approx(s.num_samples / s.sample_rate, abs=1e-6))
        assert s.ends[-1][1] - s.ends[-2][1] == pytest.approx(0.2, abs=1e-4)
    return {s.job.text: (s.path.read_bytes(), [phone for phone, _ in s.ends]) for s in results}


def test_espeak_voice_gives_festival_phones_and_the_same_bytes_in_any_batch(tmp_path):
    first, second = "She sells sea shells by the shore.", "Fish and chips."
    together = _espeak([first, second], tmp_path / "a")
    alone = _espeak([second], tmp_path / "b")
    assert together[first][1] == [
        "pau",
        "sh",
        "iy",
        "s",
        "eh",
        "z",
        "s",
        "iy",
        "sh",
        "eh",
        "z",
        "b",
        "ay",
        "dh",
        "ax",
        "sh",
        "ao",
        "pau",
    ]  # fmt: skip  (eSpeak sounds a vowel's following l inside it)
    assert together[second][1] == ["pau", "f", "ih", "sh", "ae", "n", "d", "ch", "ih", "p", "s", "pau"]
    assert together[second] == alone[second]


def test_espeak_bytes_do_not_depend_on_calls_to_the_c_librarys_rand_before(tmp_path, capfd):
    """eSpeak NG's noise comes from libc's rand(): a worker whose rand() state another call moved (a library's
    thread, once in CI under load) wrote other bytes for every file. The same job after five rand() calls:"""
    jobs = [("f2_00000", "Fish and chips, she said.")]
    files = []
    for name, calls in (("fresh", 0), ("moved", 5)):
        for _ in range(calls):
            ctypes.CDLL(None).rand()
        (tmp_path / name).mkdir()
        run_jobs(ESPEAK_VOICES["espeak-f2"], jobs, tmp_path / name)  # forks a child per job, as the worker does
        files.append((tmp_path / name / "f2_00000.wav").read_bytes())
    assert "END f2_00000" in capfd.readouterr().out
    assert files[0] == files[1]


def _zero_crossings(path: Path, onset: float, offset: float) -> float:
    with wave.open(str(path), "rb") as w:
        w.setpos(round(onset * w.getframerate()))
        x = torch.frombuffer(bytearray(w.readframes(round((offset - onset) * w.getframerate()))), dtype=torch.int16)
    return (x[1:].sign() != x[:-1].sign()).float().mean().item()


@pytest.mark.slow
def test_espeak_alignments_put_fricatives_where_the_audio_hisses(demo):
    """Sibilants cross zero several times as often as vowels: so must the segments the alignments name."""
    rates: dict[str, list[float]] = {"sibilant": [], "vowel": []}
    for record in read_alignments(demo, "train"):
        if record["speaker"].startswith("espeak-"):
            path = demo / "wav" / "train" / record["speaker"] / f"{record['fileid']}.wav"
            for onset, offset, phone in record["phones"]:
                kind = "sibilant" if phone in {"s", "sh", "z"} else "vowel" if phone in {"iy", "ae", "aa", "eh"} else ""
                if kind and offset - onset > 0.04:
                    rates[kind].append(_zero_crossings(path, onset + 0.01, offset - 0.01))
    assert min(len(r) for r in rates.values()) >= 5
    assert sum(rates["sibilant"]) / len(rates["sibilant"]) > 3 * sum(rates["vowel"]) / len(rates["vowel"])


def test_an_espeak_phoneme_without_a_festival_phone_is_an_error_naming_it():
    assert phone_ends([(10, "s"), (20, "_:")], 30, 100) == [("pau", 0.1), ("s", 0.2), ("pau", 0.3)]
    with pytest.raises(ValueError, match=re.escape("['Q7']")):
        phone_ends([(10, "s"), (20, "Q7")], 30, 100)
