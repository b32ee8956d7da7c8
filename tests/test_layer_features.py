import shutil

import polars as pl
import pytest

from hubert_pipeline.layer_features import check_dump_fits, fit_subset


def manifest(num_files: int, seconds: float) -> pl.DataFrame:
    return pl.DataFrame({"fileid": [f"f{i:04d}" for i in range(num_files)], "path": [f"f{i:04d}.wav" for i in
                         range(num_files)], "num_samples": [int(seconds * 16_000)] * num_files})  # fmt: skip


def test_the_fitting_subset_is_the_fraction_of_files_seeded_and_never_empty():
    files = manifest(295, 8.0)
    assert fit_subset(files, 1.0, seed=0).height == 295  # the demo's kmeans.fit_fraction
    assert fit_subset(files, 0.1, seed=0).height == 30  # the recipe's
    assert fit_subset(files, 0.1, seed=0).equals(fit_subset(files, 0.1, seed=0))
    assert not fit_subset(files, 0.1, seed=0).equals(fit_subset(files, 0.1, seed=1))
    assert fit_subset(files, 1e-6, seed=0).height == 1


def test_a_dump_larger_than_the_free_disk_is_refused_naming_the_fraction(tmp_path):
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    # LibriSpeech-sized: 960 h of 12 s files at Base's 768 dimensions in float32 is 530 GB (10 % of it: 53 GB)
    hours = 960 * max(1.0, free_gb / 500)
    corpus = manifest(int(hours * 3600 / 12), 12.0)
    with pytest.raises(ValueError, match=r"do not fit in the .* GB free under .*: lower kmeans.fit_fraction"):
        check_dump_fits(corpus, tmp_path / "features" / "it2", dim=768, dtype="float32")
    check_dump_fits(manifest(295, 8.0), tmp_path / "features" / "it2", dim=128, dtype="float32")  # the demo: 61 MB


def test_no_untrained_control_for_a_teacher_of_another_architecture(tmp_path, caplog):
    """A Large run's teacher is a Base model: iteration 1's initial weights are no control for it."""
    from hubert_pipeline.compat import save_native
    from hubert_pipeline.layer_quality import untrained_quality
    from hubert_pipeline.model import HuBERT, HubertConfig
    from hubert_pipeline.params import Params

    params = Params()
    other = HubertConfig.preset(params.model.size, **params.model.overrides, encoder_num_layers=2)
    save_native(HuBERT(other), tmp_path / "teacher")
    with caplog.at_level("INFO"):
        quality = untrained_quality(str(tmp_path / "teacher"), 1, manifests=tmp_path, work=tmp_path / "w",
                                    params=params)  # fmt: skip
    assert quality is None
    assert "no untrained control" in caplog.text
    assert not (tmp_path / "w").exists()
