"""hubert-encode: units of a folder, tar, manifest or file; the units stage's units; resume; the output formats."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone, write_wav
from safetensors import safe_open
from torch.testing import assert_close

from hubert_pipeline.audio import AudioSource, load_audio
from hubert_pipeline.compat import save_native
from hubert_pipeline.encode import encode, length_batches, read_units_file
from hubert_pipeline.kmeans import KMeansResult, save_centroids
from hubert_pipeline.manifest import build_manifest, write_csv
from hubert_pipeline.model import HuBERT, HubertConfig
from hubert_pipeline.params import ExecutionParams
from hubert_pipeline.unit_encoder import EncoderParts, UnitEncoder, deduplicate, layer_output, layer_outputs, sha256_of
from hubert_pipeline.units import read_units, stream_units_for_split

LAYER, K = 2, 12
CPU = ExecutionParams(workers=1, device="cpu")


def make_encoder_parts(root: Path, frontend: str = "log_mel") -> EncoderParts:
    """A tiny random model and centroids drawn from its layer outputs on a tone."""
    torch.manual_seed(0)
    model = HuBERT(HubertConfig.preset("tiny", frontend=frontend)).eval()
    save_native(model, root / "checkpoint")
    with torch.no_grad():
        frames = model.get_intermediate_outputs(torch.tensor(tone(2.0), dtype=torch.float32)[None], num_layers=LAYER,
                                                before_residual=False)[LAYER - 1][0]  # fmt: skip
    centroids = frames[torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[:K]]
    save_centroids(root / "centroids.safetensors", KMeansResult(centroids.contiguous(), 0.0, 0, len(frames), 1))
    return EncoderParts(str(root / "checkpoint"), LAYER, str(root / "centroids.safetensors"))


def write_corpus(folder: Path, count: int = 5, seconds: float = 0.7) -> Path:
    for i in range(count):
        write_wav(folder / f"utt{i:03d}.wav", tone(seconds + 0.13 * (i % 7), freq=150.0 + 40 * i, seed=i))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> EncoderParts:
    return make_encoder_parts(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "wav")


def run_encode(inputs: Path, out: Path, parts: EncoderParts, **options) -> dict:
    return encode(inputs, out, model=parts.checkpoint, layer=parts.layer, centroids=parts.centroids,
                  execution=CPU, **options)  # fmt: skip


def jsonl(path: Path) -> dict[str, dict]:
    return {row["fileid"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_the_encoder_gives_the_units_of_the_streamed_units_stage(tmp_path, parts, corpus, one_thread):
    write_csv(build_manifest(corpus)[0], tmp_path / "valid.csv")
    stream_units_for_split(tmp_path / "valid.csv", tmp_path / "stage.jsonl", teacher=parts.checkpoint,
                           layer=parts.layer, centroids=parts.centroids, num_shards=2, normalize=False,
                           tolerance=2, execution=CPU)  # fmt: skip
    meta = run_encode(corpus, tmp_path / "out", parts)
    stage = read_units(tmp_path / "stage.jsonl")
    ours = jsonl(tmp_path / "out" / "units.jsonl")
    assert list(ours) == sorted(stage)
    for fid, units in stage.items():
        assert ours[fid]["units"] == units.tolist(), fid
    assert meta["files"] == len(stage)
    assert meta["frames"] == sum(len(u) for u in stage.values())


def test_outputs_record_model_layer_and_centroid_digest_and_the_binary_form_equals_the_jsonl(tmp_path, parts, corpus,
                                                                                            one_thread):  # fmt: skip
    meta = run_encode(corpus, tmp_path / "out", parts)
    provenance = meta["provenance"]
    assert provenance["layer"] == LAYER
    assert provenance["k"] == K
    assert provenance["centroids_sha256"] == sha256_of(parts.centroids)
    assert provenance["checkpoint_sha256"] == sha256_of(parts.checkpoint)
    assert provenance["model"] == parts.checkpoint
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    binary = read_units_file(tmp_path / "out" / "units.safetensors")
    assert binary["provenance"] == provenance
    rows = jsonl(tmp_path / "out" / "units.jsonl")
    assert binary["fileids"] == list(rows)
    for fid, units in zip(binary["fileids"], binary["units"], strict=True):
        assert units.dtype == np.int32
        assert units.tolist() == rows[fid]["units"]
    assert binary["durations"] is None
    assert not (tmp_path / "out" / ".work").exists()


def test_deduplicated_units_have_durations_that_sum_to_the_frame_count(tmp_path, parts, corpus, one_thread):
    run_encode(corpus, tmp_path / "full", parts)
    meta = run_encode(corpus, tmp_path / "dedup", parts, deduplicate=True)
    full, dedup = jsonl(tmp_path / "full" / "units.jsonl"), jsonl(tmp_path / "dedup" / "units.jsonl")
    for fid, row in dedup.items():
        assert sum(row["durations"]) == len(full[fid]["units"])
        assert all(a != b for a, b in zip(row["units"], row["units"][1:], strict=False))
        assert np.repeat(row["units"], row["durations"]).tolist() == full[fid]["units"]
    assert meta["frames"] == sum(len(r["units"]) for r in full.values())
    binary = read_units_file(tmp_path / "dedup" / "units.safetensors")
    assert binary["durations"] is not None
    assert [int(d.sum()) for d in binary["durations"]] == [len(full[f]["units"]) for f in binary["fileids"]]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("frontend", ["conv", "log_mel"])
def test_a_files_features_and_units_are_the_same_alone_and_in_a_padded_batch(tmp_path, corpus, frontend, normalize,
                                                                             one_thread):  # fmt: skip
    parts = dataclasses.replace(make_encoder_parts(tmp_path, frontend), normalize=normalize)
    encoder = UnitEncoder.load(parts)
    waveforms = [load_audio(AudioSource(str(path))) for path in sorted(corpus.iterdir())]
    assert len({len(w) for w in waveforms}) == len(waveforms)  # every file padded but the longest
    batched = layer_outputs(encoder.model, waveforms, LAYER, normalize=normalize)
    for waveform, features in zip(waveforms, batched, strict=True):
        assert_close(features, layer_output(encoder.model, waveform, LAYER, normalize=normalize))
    alone, together = [encoder.units(w) for w in waveforms], encoder.units_batch(waveforms)
    assert [len(u) for u in together] == [len(u) for u in alone]
    same = sum(int((a == b).sum()) for a, b in zip(alone, together, strict=True))
    assert same >= 0.999 * sum(len(u) for u in alone)


def test_length_batches_sort_by_length_and_keep_size_times_longest_within_the_budget():
    seconds = [3.0, 1.0, 0.5, 2.0, 0.5, 9.0]
    lengths = [int(s * 16_000) for s in seconds]
    assert length_batches(lengths, 4.0) == [[2, 4, 1], [3], [0], [5]]  # 3 x 1 s; 2 x 2 s and 2 x 3 s are over 4 s
    assert length_batches(lengths, 0.0) == [[i] for i in range(len(lengths))]
    assert length_batches(lengths, 100.0) == [[2, 4, 1, 3, 0, 5]]


def test_batched_encode_writes_the_one_by_one_units_in_file_order_and_records_the_option(tmp_path, parts, corpus,
                                                                                       one_thread):  # fmt: skip
    one_by_one = run_encode(corpus, tmp_path / "one", parts, chunk_files=3)
    meta = run_encode(corpus, tmp_path / "batched", parts, chunk_files=3, batch_seconds=2.5)
    assert "batch_seconds" not in one_by_one
    assert meta["batch_seconds"] == 2.5
    assert {k: v for k, v in meta.items() if k != "batch_seconds"} == one_by_one
    expected, found = jsonl(tmp_path / "one" / "units.jsonl"), jsonl(tmp_path / "batched" / "units.jsonl")
    assert list(found) == list(expected)
    for fid, row in expected.items():
        same = sum(a == b for a, b in zip(row["units"], found[fid]["units"], strict=True))
        assert same >= 0.999 * len(row["units"]), fid
    with pytest.raises(ValueError, match="holds units of another model, centroids, layer, options"):
        run_encode(corpus, tmp_path / "batched", parts, chunk_files=3)


def test_deduplicate_of_nothing_and_of_one_run():
    values, durations = deduplicate(np.array([], dtype=np.int64))
    assert len(values) == len(durations) == 0
    values, durations = deduplicate(np.array([4, 4, 4]))
    assert values.tolist() == [4]
    assert durations.tolist() == [3]


def test_a_tar_a_manifest_and_a_single_file_give_the_folders_units(tmp_path, parts, corpus, one_thread):
    run_encode(corpus, tmp_path / "folder", parts)
    expected = jsonl(tmp_path / "folder" / "units.jsonl")
    with tarfile.open(tmp_path / "corpus.tar", "w") as tar:
        for path in sorted(corpus.iterdir()):
            tar.add(path, arcname=f"wav/{path.name}")
    write_csv(build_manifest(corpus)[0], tmp_path / "manifest.csv")
    for name, inputs in (("tar", tmp_path / "corpus.tar"), ("manifest", tmp_path / "manifest.csv")):
        run_encode(inputs, tmp_path / name, parts)
        assert jsonl(tmp_path / name / "units.jsonl") == expected, name
    run_encode(corpus / "utt002.wav", tmp_path / "one", parts)
    assert jsonl(tmp_path / "one" / "units.jsonl") == {"utt002": expected["utt002"]}


def test_resampled_input_gives_the_units_of_the_file_converted_first(tmp_path, parts, one_thread):
    samples = tone(1.0, sample_rate=22_050)
    write_wav(tmp_path / "in" / "a.wav", np.stack([samples, samples], axis=1), sample_rate=22_050)
    with pytest.raises(ValueError, match="expected mono 16000 Hz"):
        run_encode(tmp_path / "in", tmp_path / "refused", parts)
    run_encode(tmp_path / "in", tmp_path / "out", parts, resample=True, downmix=True)
    encoder = UnitEncoder.load(parts)
    expected = encoder.units(load_audio(AudioSource(str(tmp_path / "in" / "a.wav"), resample=True, downmix=True)))
    assert jsonl(tmp_path / "out" / "units.jsonl")["a"]["units"] == expected.tolist()


def test_a_rerun_into_a_folder_of_another_encoder_is_refused(tmp_path, parts, corpus, one_thread):
    run_encode(corpus, tmp_path / "out", parts)
    again = run_encode(corpus, tmp_path / "out", parts)  # complete: nothing to do
    assert again["files"] == len(list(corpus.iterdir()))
    with pytest.raises(ValueError, match="holds units of another model, centroids, layer"):
        run_encode(corpus, tmp_path / "out", parts, deduplicate=True)


def test_a_checkpoint_without_layer_and_centroids_is_an_error_naming_what_to_give(tmp_path, parts, corpus):
    with pytest.raises(ValueError, match="give --layer and --centroids"):
        encode(corpus, tmp_path / "out", model=parts.checkpoint, execution=CPU)


@pytest.mark.slow
def test_a_killed_encode_resumes_and_gives_the_uninterrupted_output(tmp_path, parts):
    corpus = write_corpus(tmp_path / "wav", count=160, seconds=2.0)
    options = ["--model", parts.checkpoint, "--layer", str(parts.layer), "--centroids", parts.centroids]
    options += ["--chunk-files", "4", "--deduplicate"]

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "hubert_pipeline.encode", str(corpus), str(out), *options]

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    chunks = killed / ".work" / "chunks"
    deadline = time.monotonic() + 300
    while len(list(chunks.glob("chunk-*.jsonl"))) < 3:
        assert proc.poll() is None, "the encode ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(chunks.glob("chunk-*.jsonl")))
    assert 3 <= written < 40  # some chunks, not all: the run was cut short
    assert not (killed / "meta.json").exists()
    assert not (killed / "units.jsonl").exists()
    result = subprocess.run(command(killed), check=True, env=env, capture_output=True, text=True)
    assert f"{written} of 40 chunks already written, resuming" in result.stderr
    for name in ("units.jsonl", "meta.json"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    tensors = {}
    for name in ("killed", "whole"):  # safetensors writes its metadata in no fixed order: compared as read
        with safe_open(tmp_path / name / "units.safetensors", framework="numpy") as f:
            tensors[name] = ({key: f.get_tensor(key).tolist() for key in f.keys()}, f.metadata())  # noqa: SIM118
    assert tensors["killed"] == tensors["whole"]
    assert set(tensors["killed"][0]) == {"units", "offsets", "durations"}


def test_the_console_script_shows_its_help_and_names_a_bad_input_without_a_traceback(tmp_path, parts):
    script = Path(sys.executable).with_name("hubert-encode")
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "units.safetensors" in shown
    assert "--deduplicate" in shown
    assert "--batch-seconds" in shown
    bad = subprocess.run([str(script), str(tmp_path / "nothing"), str(tmp_path / "out"), "--model", parts.checkpoint],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode != 0
    assert "hubert-encode: error:" in bad.stderr
    assert "Traceback" not in bad.stderr
