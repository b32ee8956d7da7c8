"""The trainer gives the losses and final weights it gave when tests/golden/train_golden.json was made.

The golden values come from the trainer as it was before its split into parts (tests/golden/make_train_golden.py
says how and when to regenerate them: only on purpose, when the recipe changes). Same torch, CPU, one thread: the
run is expected to be bit for bit the same; the tolerances below only allow for a reordered reduction.
"""

import json
import math

import pytest
from golden.make_train_golden import GOLDEN, run_recipe
from torch.testing import assert_close

LOSS_RTOL = 1e-6  # about 8 float32 ulps of a loss
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-7  # 20 AdamW steps carry a 1-ulp difference on without growth


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return json.loads(GOLDEN.read_text()), run_recipe(tmp_path_factory.mktemp("golden"))


def test_golden_run_has_the_recorded_losses_at_every_step(runs):
    golden, now = runs
    assert now["recipe"] == golden["recipe"]
    assert now["checkpoint_steps"] == golden["checkpoint_steps"] == [10, 20]
    for key, values in golden["metrics"].items():
        assert_close(now["metrics"][key], values, rtol=LOSS_RTOL, atol=0.0, msg=lambda m, k=key: f"{k}: {m}")


def test_golden_run_ends_with_the_recorded_weights(runs):
    golden, now = runs
    assert now["weights"].keys() == golden["weights"].keys()
    for key, expected in golden["weights"].items():
        got = now["weights"][key]
        assert got["shape"] == expected["shape"], key
        assert got["positions"] == expected["positions"], key
        for field in ("values", "norm"):
            assert_close(got[field], expected[field], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                         msg=lambda m, k=key, f=field: f"{k} {f}: {m}")  # fmt: skip
        # a sum may cancel to near 0: its tolerance is relative to the size of its terms
        numel = math.prod(expected["shape"])
        sum_atol = WEIGHT_RTOL * expected["norm"] * math.sqrt(numel)
        assert_close(got["sum"], expected["sum"], rtol=0.0, atol=sum_atol, msg=lambda m, k=key: f"{k} sum: {m}")
