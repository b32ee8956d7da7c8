import json

import numpy as np
import torch

from hubert_pipeline.data import LabeledSpeech, read_labeled_manifest


def test_labeled_manifest_holds_units_as_int16_arrays_and_the_dataset_gives_the_same_int64_labels(tmp_path):
    from conftest import tone, write_wav

    wav = write_wav(tmp_path / "a.wav", tone(0.5))
    units = [5, 0, 32767, 7] * 6
    large = [40_000, *units[1:]]  # beyond int16: kept as int32, not wrapped
    rows = [{"fileid": f, "path": str(wav), "num_samples": 8000, "units": u} for f, u in (("a", units), ("b", large))]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    rows = read_labeled_manifest(tmp_path / "m.jsonl")
    assert len(rows) == 2
    assert [r["units"].dtype for r in rows] == [np.int16, np.int32]
    assert [r["units"].tolist() for r in rows] == [units, large]
    for position, expected in enumerate((units, large)):
        _, _, labels = LabeledSpeech(rows, normalize=False)[(0, position)]
        assert torch.equal(labels, torch.tensor(expected, dtype=torch.long))
