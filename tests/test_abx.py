import json
import logging
import math
from pathlib import Path

import pytest
import torch
from fastabx import zerospeech_abx

from hubert_pipeline.abx import (
    abx_per_layer,
    choose_layer,
    extract_features,
    find_audio,
    main,
    plot_abx,
    read_items,
    score_features,
)
from hubert_pipeline.audio import AudioSource, load_audio
from hubert_pipeline.compat import save_native
from hubert_pipeline.demo import synthesize_demo
from hubert_pipeline.features import mfcc
from hubert_pipeline.model import HuBERT, HubertConfig
from hubert_pipeline.params import DemoParams

# 3 voices x 2 speeds: 6 speakers, one file each in the abx split (about 50 s of audio)
PARAMS = DemoParams(seed=0, train_minutes=0.0, valid_minutes=0.0, abx_minutes=0.2, speeds=(0.9, 1.12))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    synthesize_demo(out, PARAMS, workers=1)
    return out


@pytest.fixture(scope="module")
def tiny_model() -> HuBERT:
    torch.manual_seed(0)
    return HuBERT(HubertConfig.preset("tiny"))  # train mode: abx_per_layer must switch dropout off itself


@pytest.fixture(scope="module")
def scores(demo, tiny_model) -> dict[str, dict[str, float]]:
    return abx_per_layer(tiny_model, demo / "abx.item", demo / "wav" / "abx", device="cpu")


@pytest.fixture(scope="module")
def features(demo, tiny_model) -> dict[str, dict[str, torch.Tensor]]:
    labels = read_items(demo / "abx.item")
    paths = find_audio(sorted(labels["#file"].unique().to_list()), demo / "wav" / "abx")
    return extract_features(tiny_model, paths, device="cpu", max_layers=1)


def write_items(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_mfcc_baseline_errors_are_finite_and_between_0_and_50_percent(scores):
    for condition in ("within", "across"):
        assert math.isfinite(scores["mfcc"][condition])
        assert 0.0 <= scores["mfcc"][condition] <= 50.0


@pytest.mark.slow
def test_random_tiny_model_gives_one_entry_per_layer(scores, tiny_model):
    assert list(scores) == ["mfcc", *(f"layer_{k}" for k in range(1, tiny_model.config.encoder_num_layers + 1))]
    for value in scores.values():
        assert set(value) == {"within", "across"}
        assert all(0.0 <= error <= 100.0 for error in value.values())
    assert tiny_model.training  # left in the mode it came in


@pytest.mark.slow
def test_without_mfcc_only_the_layers_are_scored_and_equal_to_a_run_with_mfcc(demo, tiny_model, scores):
    got = abx_per_layer(tiny_model, demo / "abx.item", demo / "wav" / "abx", device="cpu", max_layers=2, mfcc=False)
    assert list(got) == ["layer_1", "layer_2"]
    assert got == {name: scores[name] for name in got}


@pytest.mark.slow
def test_features_equal_a_per_file_get_intermediate_outputs_call(demo, tiny_model):
    paths = dict(
        list(find_audio([p.stem for p in (demo / "wav" / "abx").rglob("*.wav")], demo / "wav" / "abx").items())[:2]
    )
    got = extract_features(tiny_model, paths, device="cpu")
    assert set(got) == {"mfcc", "layer_1", "layer_2", "layer_3", "layer_4"}
    tiny_model.eval()
    try:
        for fileid, path in paths.items():
            waveform = load_audio(AudioSource(str(path)))
            with torch.inference_mode():
                expected = tiny_model.get_intermediate_outputs(waveform[None], before_residual=False)
            torch.testing.assert_close(got["mfcc"][fileid], mfcc(waveform), rtol=0, atol=0)
            for k, layer in enumerate(expected, start=1):
                assert layer.shape[1] == got[f"layer_{k}"][fileid].shape[0]
                torch.testing.assert_close(got[f"layer_{k}"][fileid], layer[0], rtol=0, atol=0)
    finally:
        tiny_model.train()


@pytest.mark.slow
def test_scores_equal_fastabx_zerospeech_abx_on_features_saved_to_disk(demo, features, tmp_path):
    labels = read_items(demo / "abx.item")
    for name, frequency in (("mfcc", 100), ("layer_1", 50)):
        folder = tmp_path / name
        folder.mkdir()
        for fileid, tensor in features[name].items():
            torch.save(tensor, folder / f"{fileid}.pt")
        ours = score_features(labels, features[name], frequency, max_x_across=None)
        for speaker in ("within", "across"):
            theirs = zerospeech_abx(
                demo / "abx.item",
                folder,
                max_size_group=10,
                max_x_across=None,  # with 5, fastabx 0.9 draws different X speakers from run to run
                speaker=speaker,
                frequency=frequency,
                device="cpu",
                progress=False,
            )
            assert ours[speaker] == pytest.approx(100 * theirs, rel=1e-6), (name, speaker)


@pytest.mark.slow
def test_across_error_is_the_same_on_every_run(demo, features):
    labels = read_items(demo / "abx.item")
    runs = [score_features(labels, features["layer_1"], 50)["across"] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.slow
def test_items_of_a_single_speaker_give_nan_across_and_a_warning(demo, tmp_path, caplog):
    lines = (demo / "abx.item").read_text().splitlines()
    one_speaker = [lines[0]] + [" ".join([*line.split()[:-1], "spk"]) for line in lines[1:]]
    with caplog.at_level(logging.WARNING, logger="hubert_pipeline.abx"):
        scores = abx_per_layer(None, write_items(tmp_path / "one.item", one_speaker), demo / "wav" / "abx")
    assert list(scores) == ["mfcc"]
    assert math.isfinite(scores["mfcc"]["within"])
    assert math.isnan(scores["mfcc"]["across"])
    assert "across-speaker ABX is not defined" in caplog.text


@pytest.mark.slow
def test_missing_audio_for_an_item_file_id_is_an_error_naming_it(demo, tmp_path):
    lines = (demo / "abx.item").read_text().splitlines()
    items = write_items(tmp_path / "bad.item", [*lines, "no-such-file_abx_00042 0.1000 0.2000 ae SIL t kal-s090"])
    with pytest.raises(FileNotFoundError, match="no-such-file_abx_00042"):
        abx_per_layer(None, items, demo / "wav" / "abx")


def test_missing_item_file_and_wrong_header_are_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.item"):
        abx_per_layer(None, tmp_path / "absent.item", tmp_path)
    items = write_items(tmp_path / "bad.item", ["file onset offset phone", "a 0.1 0.2 ae"])
    with pytest.raises(ValueError, match=r"bad\.item: header"):
        abx_per_layer(None, items, tmp_path)


def test_items_shorter_than_one_frame_are_an_error_before_any_audio_is_read(tmp_path):
    header = "#file onset offset #phone prev-phone next-phone speaker"
    items = write_items(tmp_path / "short.item", [header, "f1 0.1000 0.1040 ae SIL t s1"])
    with pytest.raises(ValueError, match=r"shorter than one frame at 100 Hz, e\.g\. f1 0\.1000-0\.1040"):
        abx_per_layer(None, items, tmp_path)


def test_choose_layer_picks_the_lowest_error_and_the_lower_layer_on_ties():
    scores = {
        "mfcc": {"within": 1.0, "across": 1.0},  # never a candidate
        "layer_1": {"within": 9.0, "across": 20.0},
        "layer_2": {"within": 7.0, "across": 15.0},
        "layer_3": {"within": 7.0, "across": 12.0},
        "layer_10": {"within": 8.0, "across": 11.0},
        "layer_4": {"within": 8.0, "across": 11.0},
    }
    assert choose_layer(scores) == 2
    assert choose_layer(scores, "lowest_within") == 2
    assert choose_layer(scores, "lowest_across") == 4
    assert choose_layer(scores, "lowest_mean") == 3  # 9.5 (layers 3, 4, 10) tie: the lowest layer


def test_choose_layer_skips_nan_errors_and_fails_when_no_layer_is_finite():
    scores = {"layer_1": {"within": math.nan, "across": 5.0}, "layer_2": {"within": 6.0, "across": math.nan}}
    assert choose_layer(scores, "lowest_within") == 2
    assert choose_layer(scores, "lowest_across") == 1
    with pytest.raises(ValueError, match="lowest_mean"):
        choose_layer(scores, "lowest_mean")
    with pytest.raises(ValueError, match="no layer"):
        choose_layer({"mfcc": {"within": 1.0, "across": 1.0}})


def test_plot_writes_a_png_and_nothing_else(tmp_path):
    scores = {"mfcc": {"within": 10.0, "across": 15.0}} | {
        f"layer_{k}": {"within": 12.0 - k, "across": math.nan if k == 2 else 18.0 - k} for k in range(1, 5)
    }
    plot_abx(scores, tmp_path / "plots" / "abx.png", title="it1")
    assert (tmp_path / "plots" / "abx.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["abx.png"]


@pytest.mark.slow
def test_cli_writes_scores_of_a_saved_checkpoint_and_a_plot(demo, tiny_model, tmp_path):
    save_native(tiny_model, tmp_path / "checkpoint")
    lines = (demo / "abx.item").read_text().splitlines()
    fileids = sorted({line.split()[0] for line in lines[1:]})[:3]  # 3 files keep it short
    items = write_items(tmp_path / "small.item", [lines[0], *(ln for ln in lines[1:] if ln.split()[0] in fileids)])
    argv = [str(items), str(demo / "wav" / "abx"), "--checkpoint", str(tmp_path / "checkpoint")]
    main([*argv, "--output", str(tmp_path / "abx.json"), "--plot", str(tmp_path / "abx.png"), "--max-layers", "2"])
    scores = json.loads((tmp_path / "abx.json").read_text())
    assert sorted(scores) == ["layer_1", "layer_2", "mfcc"]
    assert (tmp_path / "abx.png").read_bytes()[:8] == PNG_SIGNATURE
