import json

import numpy as np
import torch

from hubert_pipeline.data import LabeledSpeech, read_labeled_manifest


def test_labeled_manifest_holds_units_as_int32_arrays_and_the_dataset_gives_the_same_int64_labels(tmp_path):
    from conftest import tone, write_wav

    wav = write_wav(tmp_path / "a.wav", tone(0.5))
    units = [5, 0, 99, 7] * 6
    row = {"fileid": "a", "path": str(wav), "num_samples": 8000, "units": units}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n\n")
    rows = read_labeled_manifest(tmp_path / "m.jsonl")
    assert len(rows) == 1
    assert rows[0]["units"].dtype == np.int32
    assert rows[0]["units"].tolist() == units
    _, _, labels = LabeledSpeech(rows, normalize=False)[(0, 0)]
    assert torch.equal(labels, torch.tensor(units, dtype=torch.long))
