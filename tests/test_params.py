from pathlib import Path

import pytest
import yaml

from hubert_pipeline.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_file_loads_with_recipe_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.kmeans.k_it1 == 100
    assert params.kmeans.k == 500
    assert params.kmeans.fit_fraction == pytest.approx(1.0)  # the demo's; the presets set the recipe's 0.1
    assert params.train_it1.mask_length == params.train_it2.mask_length == 2  # the demo's; the presets set 10
    assert params.demo.voices == ("kal", "ked", "slt")
    assert isinstance(params.demo.speeds, tuple)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ParamsError, match=r"kmeans.*'kk'"):
        load_params(write(tmp_path, {"kmeans": {"kk": 3}}))


def test_wrong_type_names_the_key_and_value(tmp_path):
    with pytest.raises(ParamsError, match=r"kmeans\.k: expected int, got 'many'"):
        load_params(write(tmp_path, {"kmeans": {"k": "many"}}))


def test_choice_outside_literal_is_rejected(tmp_path):
    with pytest.raises(ParamsError, match=r"manifest\.on_bad_file: 'ignore' is not one of"):
        load_params(write(tmp_path, {"manifest": {"on_bad_file": "ignore"}}))


def test_out_of_range_value_is_rejected(tmp_path):
    with pytest.raises(ParamsError, match="fit_fraction"):
        load_params(write(tmp_path, {"kmeans": {"fit_fraction": 1.5}}))


@pytest.mark.parametrize(
    ("key", "value"), [("room_rt60", [0.5, 0.1]), ("room_rt60", [0.3]), ("noise_snr_db", [20, 200])]
)
def test_a_demo_range_must_be_empty_or_low_high(tmp_path, key, value):
    with pytest.raises(ParamsError, match=rf"demo\.{key} must be \[\] or \[low, high\]"):
        load_params(write(tmp_path, {"demo": {key: value}}))
    assert getattr(load_params(write(tmp_path, {"demo": {key: []}})).demo, key) == ()


def test_ints_are_accepted_for_floats_and_lists_become_tuples(tmp_path):
    params = load_params(write(tmp_path, {"demo": {"train_minutes": 1, "speeds": [1, 2]}}))
    assert params.demo.train_minutes == 1.0
    assert params.demo.speeds == (1.0, 2.0)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_manifest_extension_is_one_extension_or_a_list_of_known_ones(tmp_path):
    assert load_params(write(tmp_path, {"manifest": {"extension": ".flac"}})).manifest.extensions == (".flac",)
    both = load_params(write(tmp_path, {"manifest": {"extension": [".flac", ".wav"]}})).manifest
    assert both.extensions == (".flac", ".wav")
    with pytest.raises(ParamsError, match=r"manifest.extension '\.txt' is not an audio extension \(\.wav, \.flac"):
        load_params(write(tmp_path, {"manifest": {"extension": [".wav", ".txt"]}}))
    with pytest.raises(ParamsError, match=r"manifest\.verify: 'all' is not one of \['header', 'full'\]"):
        load_params(write(tmp_path, {"manifest": {"verify": "all"}}))


def test_convert_is_off_by_default_and_its_extension_is_checked_by_name(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.convert.corpora == {}
    assert params.convert.format == "flac"
    on = load_params(write(tmp_path, {"convert": {"corpora": {"train": "/cv/train"}, "extension": [".mp3", ".opus"]}}))
    assert on.convert.corpora == {"train": "/cv/train"}
    assert on.convert.extensions == (".mp3", ".opus")
    with pytest.raises(ParamsError, match=r"convert\.extension '\.txt' is not an audio extension"):
        load_params(write(tmp_path, {"convert": {"extension": ".txt"}}))
