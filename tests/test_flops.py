"""Model FLOPs from the configuration: equal to torch's FLOP counter on the model, Base's usual figure, MFU peaks."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hubert_pipeline.flops import flops_per_audio_second, forward_flops, peak_flops, train_step_flops
from hubert_pipeline.model import HubertConfig, HuBERTPretrain, conv_frames


def counted_forward(cfg: HubertConfig, num_classes: int, samples: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = HuBERTPretrain(cfg, num_classes)
    waveforms = torch.randn(2, samples)
    frames = conv_frames(samples, cfg.conv_layers)
    labels = torch.randint(num_classes, (2, frames))
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(waveforms, labels, mask=mask, attention_mask=None)
    return float(counter.get_total_flops()), int(mask.sum())


def test_forward_flops_equal_torch_s_flop_counter_on_the_tiny_model():
    cfg = HubertConfig.preset("tiny")
    counted, masked = counted_forward(cfg, 50, 32_000)
    ours = forward_flops(cfg, 50, batch=2, samples=32_000, masked_frames=masked)
    assert ours == pytest.approx(counted, rel=1e-3)  # measured 4e-4: the counter's conv over padding


def test_log_mel_forward_flops_are_the_counter_s_plus_the_rfft_it_does_not_count():
    cfg = HubertConfig.preset("tiny", frontend="log_mel")
    counted, masked = counted_forward(cfg, 50, 32_000)
    ours = forward_flops(cfg, 50, batch=2, samples=32_000, masked_frames=masked)
    assert counted < ours < 1.05 * counted


def test_base_trains_on_about_4_4e10_flops_per_second_of_audio():
    base = HubertConfig.preset("base")
    assert 4.1e10 < flops_per_audio_second(base, utterance_seconds=2.0) < 4.3e10
    assert 4.3e10 < flops_per_audio_second(base, utterance_seconds=10.0) < 4.5e10
    assert 4.5e10 < flops_per_audio_second(base, utterance_seconds=15.6) < 4.7e10
    log_mel = HubertConfig.preset("base", frontend="log_mel")
    assert flops_per_audio_second(log_mel) < 0.7 * flops_per_audio_second(base)


def test_a_training_step_counts_three_forwards():
    cfg = HubertConfig.preset("base")
    fwd = forward_flops(cfg, 500, batch=4, samples=80_000, masked_frames=400)
    assert train_step_flops(cfg, 500, batch=4, samples=80_000, masked_frames=400) == 3 * fwd


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
     ("NVIDIA H100 PCIe", 756e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_peak_flops_are_the_dense_bf16_peaks_of_the_table(name, peak):
    assert peak_flops(name) == peak


def test_training_logs_the_model_flop_rate_and_no_mfu_on_cpu(tmp_path):
    from dataclasses import replace

    from test_train import CFG, NO_DROPOUT, make_manifest

    from hubert_pipeline.train import train

    logged = []
    train(make_manifest(tmp_path, n_files=4), tmp_path / "run", cfg=replace(CFG, max_steps=2), model_size="tiny",
          model_overrides=NO_DROPOUT, num_classes=8, log_fn=lambda metrics, _step: logged.append(metrics))  # fmt: skip
    assert len(logged) == 2
    assert all(m["model_flops_per_second"] > 0 for m in logged)
    assert not any("mfu" in m for m in logged)  # no peak for a CPU: the rate alone
