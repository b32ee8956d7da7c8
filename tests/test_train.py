"""Training on tiny real audio: loss falls, checkpoints exact, resume matches, DDP matches one process."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import write_wav

import hubert_pipeline
from hubert_pipeline.checkpoint import OtherRunError
from hubert_pipeline.model import HuBERT, HubertConfig
from hubert_pipeline.params import TrainParams, ValidateParams
from hubert_pipeline.train import NonFiniteLossError, initial_model, list_checkpoints, train
from hubert_pipeline.units import model_frames
from hubert_pipeline.validate import choose, validate_checkpoints

NO_DROPOUT = {
    "encoder_projection_dropout": 0.0,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
}
CFG = TrainParams(
    max_steps=6,
    warmup_steps=2,
    lr=1e-3,
    max_batch_samples=4 * 48_000,
    min_sample_size=16_000,
    max_sample_size=48_000,
    num_buckets=2,
    save_interval=2,
    log_interval=1,
    num_workers=0,
    mask_prob=0.5,
    mask_length=4,
)

VALID = ValidateParams(max_batch_samples=200_000)
PARAMS = Path(__file__).parents[1] / "params.yaml"


def make_manifest(folder, n_files=12, classes=8):
    """Files alternating between pitches; the unit of a frame is its pitch class: learnable from the audio."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_files):
        seconds = 1.5 + 0.5 * (i % 4)
        n = int(seconds * 16_000)
        segments = rng.integers(0, classes, size=int(seconds * 5))
        per = -(-n // len(segments))
        freqs = np.repeat(200 + 100 * segments, per)[:n]
        phase = np.cumsum(2 * np.pi * freqs / 16_000)
        wav = 0.4 * np.sin(phase) + rng.normal(0, 0.01, n)
        path = write_wav(folder / f"f{i:02d}.wav", wav)
        frames = model_frames(n)
        units = [int(segments[min(len(segments) - 1, (k * 320 + 200) // per)]) for k in range(frames)]
        rows.append({"fileid": f"f{i:02d}", "path": str(path), "num_samples": n, "units": units})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("data"))


def run_train(manifest, out, cfg=CFG, *, stop_at=None, overrides=NO_DROPOUT):
    losses = {}

    def log(metrics, step):
        losses[step] = metrics["train_loss"]
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt  # a kill right after this step

    train(manifest, out, cfg=cfg, model_size="tiny", model_overrides=overrides, num_classes=8, log_fn=log)
    return losses


def test_checkpoints_are_saved_every_interval_exactly_and_at_the_end(manifest, tmp_path):
    cfg = replace(CFG, max_steps=5)
    run_train(manifest, tmp_path, cfg)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    state = torch.load(tmp_path / "step_00000005.pt", weights_only=True)
    assert state["step"] == 5
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "steps_in_epoch", "model_config"} <= set(state)
    assert HubertConfig.from_dict(state["model_config"]).encoder_dropout == 0.0


def test_a_training_checkpoint_of_the_log_mel_model_loads_as_a_teacher(manifest, tmp_path):
    """`iteration2.teacher` may be any step_*.pt: its config comes from the checkpoint, not from the shapes (log-mel
    models have no conv extractor to infer one from)."""
    cfg = replace(CFG, max_steps=2)
    run_train(manifest, tmp_path, cfg, overrides={**NO_DROPOUT, "frontend": "log_mel"})
    state = torch.load(tmp_path / "step_00000002.pt", weights_only=True)
    teacher = HuBERT.from_pretrained(tmp_path / "step_00000002.pt")
    assert teacher.config == HubertConfig.from_dict(state["model_config"])
    weights = {k: v for k, v in state["model"].items() if k in teacher.state_dict()}
    assert weights
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in weights.items())


def test_the_untrained_control_holds_the_weights_a_run_starts_from(manifest, tmp_path):
    """With lr 0 AdamW leaves every weight as it was (its decay is lr x weight_decay): the checkpoint after two steps
    holds the run's initial weights, which `initial_model` gives without training."""
    cfg = replace(CFG, max_steps=2, lr=0.0, weight_decay=0.01, seed=3)
    run_train(manifest, tmp_path, cfg)
    trained = torch.load(tmp_path / "step_00000002.pt", weights_only=True)["model"]
    start = initial_model(cfg, HubertConfig.preset("tiny", **NO_DROPOUT), 8).state_dict()
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[k], trained[k]) for k in start)
    other = initial_model(replace(cfg, seed=4), HubertConfig.preset("tiny", **NO_DROPOUT), 8).state_dict()
    assert not torch.equal(other["encoder.layers.0.feed_forward.output_dense.weight"],
                           start["encoder.layers.0.feed_forward.output_dense.weight"])  # fmt: skip


def test_resumed_run_gives_the_losses_and_weights_of_an_uninterrupted_run(manifest, tmp_path):
    full = run_train(manifest, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_train(manifest, tmp_path / "cut", stop_at=5)  # killed after step 5: the last checkpoint is step 4
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2, 4]
    resumed = run_train(manifest, tmp_path / "cut")
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)
    a = torch.load(tmp_path / "full" / "step_00000006.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "step_00000006.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_loss_falls_on_learnable_units_and_validation_finds_it_learning(manifest, tmp_path):
    from hubert_pipeline.validate import health_warning

    cfg = replace(CFG, max_steps=40, warmup_steps=5, save_interval=20, lr=2e-3)
    losses = run_train(manifest, tmp_path, cfg)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert last < first - 0.15, (first, last)
    scores = validate_checkpoints(manifest, list_checkpoints(tmp_path), cfg=VALID, train_cfg=cfg)
    assert health_warning(scores, cfg.max_steps) is None, scores


def test_non_finite_loss_stops_training_with_an_error_naming_the_step(manifest, tmp_path):
    cfg = replace(CFG, lr=1e30, warmup_steps=0, max_steps=20, grad_clip=1e30)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        run_train(manifest, tmp_path, cfg)


def test_units_out_of_range_fail_before_training(manifest, tmp_path):
    with pytest.raises(ValueError, match="out of range for 4 classes"):
        train(manifest, tmp_path, cfg=CFG, model_size="tiny", num_classes=4)


def test_validation_scores_are_identical_on_every_run_and_the_rule_picks(manifest, tmp_path):
    run_train(manifest, tmp_path)
    checkpoints = list_checkpoints(tmp_path)
    first = validate_checkpoints(manifest, checkpoints, cfg=ValidateParams(max_batch_samples=200_000), train_cfg=CFG)
    again = validate_checkpoints(
        manifest, checkpoints[::-1], cfg=ValidateParams(max_batch_samples=200_000), train_cfg=CFG
    )
    assert {s.step: s.loss for s in first} == {s.step: s.loss for s in again}
    assert len({s.frames for s in first}) == 1
    assert choose(first, "last").step == 6
    assert choose(first, "lowest_loss").loss == min(s.loss for s in first)


def _ddp_worker(rank, port, manifest, out, cfg):
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    train(manifest, out, cfg=cfg, model_size="tiny", model_overrides=NO_DROPOUT, num_classes=8)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_with_two_cpu_processes_matches_one_process_at_the_same_global_batch(manifest, tmp_path, accumulate):
    """2 processes x `accumulate` micro-batches against 1 x 2 `accumulate`: the same batches in every step.

    The masked frames differ between the micro-batches of a step, so the weights agree only because each
    micro-batch's loss is divided by the masked frames of the whole step over both processes (fairseq's
    sample_size), not by those of its own process.
    """
    cfg = replace(CFG, max_steps=4, max_batch_samples=2 * 48_000, accumulate=accumulate)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(manifest), str(tmp_path / "ddp"), cfg), nprocs=2)
    run_train(manifest, tmp_path / "single", replace(cfg, accumulate=2 * accumulate))
    a = torch.load(tmp_path / "single" / "step_00000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "step_00000004.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_checkpoints_of_another_configuration_are_not_resumed(manifest, tmp_path):
    run_train(manifest, tmp_path, replace(CFG, max_steps=2))
    other = replace(CFG, max_steps=4, lr=5e-4)  # another experiment in the same folder
    losses = run_train(manifest, tmp_path, other)
    assert sorted(losses) == [1, 2, 3, 4]  # trained from step 0, not resumed from step 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_raising_max_steps_resumes_the_same_run(manifest, tmp_path):
    run_train(manifest, tmp_path, replace(CFG, max_steps=2))
    losses = run_train(manifest, tmp_path, replace(CFG, max_steps=4))
    assert sorted(losses) == [3, 4]


def test_a_run_past_max_steps_is_not_resumed_nor_removed(manifest, tmp_path):
    """Lowering max_steps after a run: its checkpoints past the new max_steps would pass for this run's."""
    run_train(manifest, tmp_path, replace(CFG, max_steps=4))
    before = {path: path.read_bytes() for _, path in list_checkpoints(tmp_path)}
    with pytest.raises(OtherRunError, match=r"trained to step 4, beyond max_steps 2: remove the folder"):
        run_train(manifest, tmp_path, replace(CFG, max_steps=2))
    assert {path: path.read_bytes() for _, path in list_checkpoints(tmp_path)} == before


def _train_cli(code: Path, params: Path, manifest: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m hubert_pipeline.train` importing the library from `code` (a copy of it)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "hubert_pipeline.train", str(manifest), str(out), "--num-classes", "8",
               "--params", str(params)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_a_run_of_other_training_code_stops_naming_the_module_and_resumes_only_when_asked(manifest, tmp_path):
    """DVC reruns pretrain_itN when its code changed; its persisted checkpoints must not pass for the new code's."""
    code = tmp_path / "code"
    shutil.copytree(Path(hubert_pipeline.__file__).parent, code / "hubert_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    params = yaml.safe_load(PARAMS.read_text())
    params["train_it1"] = {**dataclasses.asdict(replace(CFG, max_steps=2, warmup_steps=1)), "betas": list(CFG.betas)}
    params["model"] = {"size": "tiny", "overrides": NO_DROPOUT, "recipe": ""}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "checkpoints"
    first = _train_cli(code, tmp_path / "params.yaml", manifest, out)
    assert first.returncode == 0, first.stderr
    saved = (out / "step_00000002.pt").read_bytes()

    with (code / "hubert_pipeline" / "model.py").open("a") as f:
        f.write("# an edit: the training code is not the one that wrote the checkpoints\n")
    params["train_it1"]["max_steps"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    refused = _train_cli(code, tmp_path / "params.yaml", manifest, out)
    assert refused.returncode != 0
    assert "step_00000002.pt was written by other training code (changed: model.py)" in refused.stderr
    assert "set resume_other_code: true" in refused.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert (out / "step_00000002.pt").read_bytes() == saved

    params["train_it1"]["resume_other_code"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    resumed = _train_cli(code, tmp_path / "params.yaml", manifest, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "(changed: model.py): resumed all the same" in resumed.stderr
    assert "resuming from" in resumed.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]


def shuffled_units(manifest, out_folder):
    """The same files with every file's units permuted: nothing about a frame's unit is in its audio."""
    rng = np.random.default_rng(1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["units"] = rng.permutation(row["units"]).tolist()
    out = out_folder / "shuffled.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.slow
def test_validation_flags_a_run_on_shuffled_units(manifest, tmp_path):
    from hubert_pipeline.validate import health_warning

    cfg = replace(CFG, max_steps=8, warmup_steps=2, save_interval=4, lr=2e-3)
    units = shuffled_units(manifest, tmp_path)
    run_train(units, tmp_path / "run", cfg)
    scores = validate_checkpoints(units, list_checkpoints(tmp_path / "run"), cfg=VALID, train_cfg=cfg)
    assert 0.125 <= scores[0].commonest_rate < 0.5  # 8 pitch classes
    warning = health_warning(scores, cfg.max_steps)
    assert warning is not None
    assert "under twice the commonest-unit rate" in warning


def test_the_health_check_looks_only_at_checkpoints_past_half_of_the_run():
    from hubert_pipeline.validate import CheckpointScore, health_warning

    def score(step, accuracy):
        return CheckpointScore(step, f"step_{step}.pt", 1.0, accuracy, 100, commonest_rate=0.05)

    assert health_warning([score(100, 0.05), score(300, 0.11), score(400, 0.12)], max_steps=400) is None
    warning = health_warning([score(100, 0.30), score(300, 0.09), score(400, 0.12)], max_steps=400)
    assert warning is not None
    assert "0.0900 at step 300 (of 400)" in warning


def test_batches_of_neighbouring_lengths_train_on_more_of_the_audio_than_coarse_buckets():
    from hubert_pipeline.data import ResumableBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(32_000, 210_000, size=300).tolist()  # 2 to 13 s, like the demo corpus

    def used(num_buckets, pad_audio=False):
        sampler = ResumableBatchSampler(
            lengths,
            max_batch_samples=480_000,
            min_sample_size=32_000,
            max_sample_size=250_000,
            num_buckets=num_buckets,
            seed=0,
            shuffle=True,
        )
        return sampler.audio_used(lengths, max_sample_size=250_000, pad_audio=pad_audio)

    assert used(20, pad_audio=True) == pytest.approx(1.0)
    assert used(150) > used(20) + 0.01
    assert used(150) > 0.98


def test_a_stop_request_saves_the_step_raises_interrupted_and_the_resumed_run_matches(manifest, tmp_path):
    from hubert_pipeline.train import Interrupted

    full = run_train(manifest, tmp_path / "full")
    steps = []

    def stop_after_step_3():  # polled once per step, before that step is counted
        steps.append(len(steps) + 1)
        return len(steps) == 3

    with pytest.raises(Interrupted, match="stopped at step 3"):
        train(manifest, tmp_path / "cut", cfg=CFG, model_size="tiny", model_overrides=NO_DROPOUT, num_classes=8,
              stop_requested=stop_after_step_3)  # fmt: skip
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2, 3]  # step 3 saved off the save interval
    resumed = run_train(manifest, tmp_path / "cut")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)
