import json
import subprocess
import sys

import pytest
import torch
from minimal_hubert.model import HuBERTPretrain as ReferencePretrain
from torch.testing import assert_close

from hubert_pipeline.model import SIZES, HuBERT, HubertConfig, HuBERTPretrain
from hubert_pipeline.units import model_frames

NUM_CLASSES = 100


def tiny(**overrides) -> HubertConfig:
    return HubertConfig.preset("tiny", **overrides)


def seeded(model_cls, *args, seed: int = 0):
    torch.manual_seed(seed)
    return model_cls(*args)


@pytest.mark.parametrize(
    ("size", "parameters"),
    [("tiny", 933_824), ("base", 94_370_944), ("large", 315_434_112), ("xlarge", 962_492_544)],
)
def test_every_preset_builds_with_the_expected_number_of_parameters(size, parameters):
    with torch.device("meta"):  # no memory, no init cost: xlarge is 1B parameters
        model = HuBERT(HubertConfig.preset(size))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_every_preset_keeps_fairseq_kernels_and_strides():
    base = HubertConfig.preset("base").conv_layers
    for size in SIZES:
        assert [(k, s) for _, k, s in HubertConfig.preset(size).conv_layers] == [(k, s) for _, k, s in base]


def test_loading_a_log_mel_model_first_leaves_torchaudios_module_constants_on_the_cpu(tmp_path):
    # from_state_dict builds on "meta": torchaudio imported there for the first time made kaldi's EPSILON a meta
    # tensor, and every later MFCC of that process failed ("Cannot copy out of meta tensor"). A fresh interpreter,
    # since any earlier import of torchaudio hides it.
    from safetensors.torch import save_file

    save_file(HuBERT(tiny(frontend="log_mel")).state_dict(), tmp_path / "model.safetensors")
    code = f"""
import sys, torch
from safetensors.torch import load_file
from hubert_pipeline.model import HuBERT, HubertConfig
assert "torchaudio" not in sys.modules
config = HubertConfig.preset("tiny", frontend="log_mel")
HuBERT.from_state_dict(load_file({str(tmp_path / "model.safetensors")!r}), config)
import torchaudio.compliance.kaldi as kaldi
print(kaldi.EPSILON.device, kaldi.mfcc(torch.randn(1, 16000)).shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "cpu"


@pytest.mark.parametrize("num_samples", [400, 401, 719, 720, 16_000, 16_319, 16_320, 33_333])
def test_tiny_model_gives_one_output_per_model_frame(num_samples):
    model = seeded(HuBERT, tiny()).eval()
    with torch.no_grad():
        out = model(torch.randn(3, num_samples))
    assert out.shape == (3, model_frames(num_samples), 128)


def test_waveforms_that_are_not_batched_or_too_short_are_rejected():
    model = HuBERT(tiny()).eval()
    with pytest.raises(ValueError, match="batch, samples"):
        model(torch.randn(16_000))
    with pytest.raises(ValueError, match="at least 400"):
        model(torch.randn(1, 399))


def encode(model, waveforms):
    """HuBERT's forward, for either implementation."""
    return model.encoder(model.feature_projection(model.feature_extractor(waveforms)))


@pytest.mark.slow
def test_base_pretrain_state_dict_has_minimal_hubert_keys_and_shapes():
    ours = seeded(HuBERTPretrain, HubertConfig.preset("base"), NUM_CLASSES).state_dict()
    reference = seeded(ReferencePretrain, NUM_CLASSES, "base").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert list(ours) == list(reference)


@pytest.mark.slow
def test_weights_exchanged_with_minimal_hubert_give_identical_outputs_and_losses():
    ours = seeded(HuBERTPretrain, HubertConfig.preset("base"), NUM_CLASSES, seed=1).eval()
    reference = seeded(ReferencePretrain, NUM_CLASSES, "base", seed=2).eval()
    reference_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(3)
    waveforms = torch.randn(2, 6_000)
    frames = int(model_frames(6_000))
    labels = torch.randint(0, NUM_CLASSES, (2, frames))
    mask = torch.rand(2, frames) < 0.5

    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert_close(encode(ours, waveforms), encode(reference, waveforms))
        loss, out = ours(waveforms, labels, mask=mask, attention_mask=None)
        reference_loss, _ = reference(waveforms, labels, mask=mask, attention_mask=None)
    # minimal_hubert adds the feature penalty into every frame's loss; we return it apart.
    assert_close(loss + out["feature_penalty"], reference_loss, atol=1e-5, rtol=1e-5)

    ours.load_state_dict(reference_weights)
    reference.load_state_dict(reference_weights)
    with torch.no_grad():
        assert_close(encode(ours, waveforms), encode(reference, waveforms))


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_last_intermediate_output_after_residual_is_the_forward_output(layer_norm_first):
    cfg = tiny(
        encoder_layer_norm_first=layer_norm_first, extractor_mode="layer_norm" if layer_norm_first else "group_norm"
    )
    model = seeded(HuBERT, cfg).eval()
    waveforms = torch.randn(2, 8_000)
    with torch.no_grad():
        outputs = model.get_intermediate_outputs(waveforms, before_residual=False)
        expected = model(waveforms)
    assert len(outputs) == cfg.encoder_num_layers
    last = model.encoder.layer_norm(outputs[-1]) if layer_norm_first else outputs[-1]  # pre-norm: a final norm
    assert_close(last, expected)


def test_padding_under_an_attention_mask_leaves_the_frames_of_the_shorter_file_unchanged():
    model = seeded(HuBERT, tiny(extractor_mode="layer_norm")).eval()  # group norm would see the padding
    short, long = torch.randn(1, 8_000), torch.randn(1, 12_000)
    padded = torch.cat([torch.nn.functional.pad(short, (0, 4_000)), long])
    frames = torch.tensor([model_frames(8_000), model_frames(12_000)])
    attention_mask = (torch.arange(int(frames.max())) < frames[:, None])[:, None, None, :]  # (B, 1, 1, frames)
    with torch.no_grad():
        out = model(padded, attention_mask=attention_mask)
        assert_close(out[0, : frames[0]], model(short)[0])
        assert_close(out[1], model(long)[0])


def test_intermediate_outputs_stop_at_num_layers_and_reject_impossible_counts():
    model = seeded(HuBERT, tiny()).eval()
    waveforms = torch.randn(1, 8_000)
    with torch.no_grad():
        before = model.get_intermediate_outputs(waveforms, num_layers=2)
        after = model.get_intermediate_outputs(waveforms, num_layers=2, before_residual=False)
    assert len(before) == len(after) == 2
    assert all(x.shape == (1, model_frames(8_000), 128) for x in before + after)
    assert not torch.allclose(before[-1], after[-1])
    for num_layers in (0, 5):
        with pytest.raises(ValueError, match="num_layers"):
            model.get_intermediate_outputs(waveforms, num_layers=num_layers)


def batch(num_samples=(16_000, 12_000), seed=0):
    """Zero-padded waveforms, labels with -1 on padded frames, and a random mask."""
    generator = torch.Generator().manual_seed(seed)
    frames = int(model_frames(max(num_samples)))
    waveforms = torch.randn(len(num_samples), max(num_samples), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (len(num_samples), frames), generator=generator)
    for i, n in enumerate(num_samples):
        waveforms[i, n:] = 0
        labels[i, model_frames(n) :] = -1
    mask = torch.rand(labels.shape, generator=generator) < 0.5
    return waveforms, labels, mask


def test_pretrain_loss_counts_only_masked_frames_that_have_a_label():
    model = seeded(HuBERTPretrain, tiny(), NUM_CLASSES)
    waveforms, labels, mask = batch()
    assert (mask & (labels == -1)).any(), "the batch must mask some padding frames"
    loss, out = model(waveforms, labels, mask=mask, attention_mask=None)
    expected = int((mask & (labels >= 0)).sum())
    assert loss.shape == out["logits_loss"].shape == out["correct"].shape == (expected,)
    assert out["correct"].dtype == torch.bool
    assert out["feature_penalty"].ndim == 0
    assert torch.isfinite(loss).all()
    assert torch.isfinite(out["feature_penalty"])


def test_pretrain_loss_without_a_mask_predicts_every_labelled_frame():
    model = seeded(HuBERTPretrain, tiny(), NUM_CLASSES).eval()
    waveforms, labels, _ = batch()
    with torch.no_grad():
        loss, _ = model(waveforms, labels, mask=None, attention_mask=None)
    assert loss.shape == (int((labels >= 0).sum()),)


def test_pretrain_accuracy_is_whether_the_label_has_the_largest_logit():
    model = seeded(HuBERTPretrain, tiny(), NUM_CLASSES).eval()
    waveforms, labels, mask = batch()
    with torch.no_grad():
        _, out = model(waveforms, labels, mask=mask, attention_mask=None)
        x = model.encoder(
            torch.where(
                mask.unsqueeze(-1), model.mask_embedding, model.feature_projection(model.feature_extractor(waveforms))
            )
        )
        selected = mask & (labels >= 0)
        logits = model.logit_generator(x[selected])
    assert_close(out["correct"], logits.argmax(-1) == labels[selected])


def test_labels_or_masks_of_the_wrong_length_are_rejected():
    model = HuBERTPretrain(tiny(), NUM_CLASSES)
    waveforms, labels, mask = batch()
    with pytest.raises(ValueError, match="labels"):
        model(waveforms, labels[:, :-1], mask=None, attention_mask=None)
    with pytest.raises(ValueError, match="mask"):
        model(waveforms, labels, mask=mask[:, :-1], attention_mask=None)


def conv_and_projection_grads(feature_grad_mult: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = seeded(HuBERTPretrain, tiny(feature_grad_mult=feature_grad_mult), NUM_CLASSES).eval()  # no dropout
    waveforms, labels, mask = batch()
    loss, out = model(waveforms, labels, mask=mask, attention_mask=None)
    (loss.sum() + 10 * out["feature_penalty"]).backward()
    conv = [p.grad for p in model.feature_extractor.parameters()]
    projection = [p.grad for p in model.feature_projection.parameters()]
    return conv, projection


def test_feature_grad_mult_scales_only_the_gradients_into_the_conv_extractor():
    conv_full, projection_full = conv_and_projection_grads(1.0)
    conv_scaled, projection_scaled = conv_and_projection_grads(0.1)
    assert all(g is not None and g.abs().sum() > 0 for g in conv_scaled)
    for full, scaled in zip(conv_full, conv_scaled, strict=True):
        assert_close(scaled, 0.1 * full, rtol=1e-4, atol=1e-7)
    for full, scaled in zip(projection_full, projection_scaled, strict=True):
        assert_close(scaled, full, rtol=1e-4, atol=1e-7)


def test_feature_grad_mult_of_zero_freezes_the_conv_extractor():
    conv, projection = conv_and_projection_grads(0.0)
    assert all(g is None for g in conv)
    assert all(g is not None for g in projection)


def test_unknown_size_is_an_error_listing_the_sizes():
    with pytest.raises(ValueError, match="tiny, base, large, xlarge"):
        HubertConfig.preset("huge")  # ty: ignore[invalid-argument-type]


def test_unknown_override_is_an_error_naming_it():
    with pytest.raises(ValueError, match="encoder_dropuot"):
        HubertConfig.preset("base", encoder_dropuot=0.2)


def test_overrides_replace_preset_values():
    cfg = HubertConfig.preset("base", encoder_layer_drop=0.0, final_dim=128)
    assert (cfg.encoder_layer_drop, cfg.final_dim, cfg.encoder_embed_dim) == (0.0, 128, 768)


def test_config_survives_a_json_round_trip_with_tuples_restored():
    cfg = HubertConfig.preset("large", conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 6)
    restored = HubertConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert isinstance(restored.conv_layers[0], tuple)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        HubertConfig.from_dict({**tiny().to_dict(), "bogus": 1})


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        tiny(encoder_num_heads=3)
    with pytest.raises(ValueError, match="extractor_mode"):
        tiny(extractor_mode="batch_norm")


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_every_transformer_linear_starts_as_fairseq_init_bert_params(size):
    # fairseq's TransformerEncoder applies init_bert_params: N(0, 0.02) and zero bias for q, k, v, out and the
    # feed-forward; spidr's order of init let xavier win for q/k/v/out (std 0.044 / 0.088 on tiny).
    model = seeded(HuBERT, HubertConfig.preset(size))
    linears = [m for m in model.encoder.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * model.config.encoder_num_layers
    for linear in linears:
        assert abs(float(linear.weight.detach().std()) - 0.02) < 0.001
        assert abs(float(linear.weight.detach().mean())) < 0.001
        assert not linear.bias.any()


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560, 719, 720, 16_000, 33_333])
def test_log_mel_front_end_gives_the_conv_extractors_frames_and_holds_no_weights(num_samples):
    model = seeded(HuBERT, tiny(frontend="log_mel")).eval()
    with torch.no_grad():
        out = model(torch.randn(2, num_samples))
    assert out.shape == (2, model_frames(num_samples), 128)
    assert not any(k.startswith("feature_extractor.") for k in model.state_dict())


def test_log_mel_frame_i_sees_the_audio_from_sample_320_i_only():
    # Frame i stacks the 10 ms frames 2i and 2i+1: samples [320 i, 320 i + 560). Changing audio after that leaves it.
    model = seeded(HuBERT, tiny(frontend="log_mel")).eval()
    audio = torch.randn(1, 16_000)
    changed = audio.clone()
    changed[0, 320 * 10 + 560 :] = 0.0
    before, after = model.feature_extractor(audio), model.feature_extractor(changed)
    assert_close(before[:, :11], after[:, :11])
    assert not torch.allclose(before[:, 11], after[:, 11])


def zero_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random waveforms of these lengths, zero-padded into one (B, longest) batch, and their lengths (B,)."""
    torch.manual_seed(seed)
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveforms[i, :n] = torch.randn(n)
    return waveforms, torch.tensor(lengths)


@pytest.mark.parametrize("frontend", ["conv", "log_mel"])
def test_a_files_loss_is_the_same_alone_and_padded_in_a_batch_of_other_lengths(frontend):
    # Conv layer 0's GroupNorm normalises over time: a padded file would be scored on other statistics than alone.
    model = seeded(HuBERTPretrain, tiny(frontend=frontend, encoder_dropout=0.0, encoder_attention_dropout=0.0,
                                        encoder_projection_dropout=0.0), NUM_CLASSES).eval()  # fmt: skip
    waveforms, lengths = zero_padded([16_000, 9_600, 12_800])
    frames = torch.tensor([model_frames(int(n)) for n in lengths])
    labels = torch.randint(NUM_CLASSES, (3, int(frames.max())))
    padding = torch.arange(labels.shape[1]) >= frames[:, None]
    labels[padding] = -1
    mask = (torch.rand(labels.shape) < 0.5) & ~padding
    with torch.no_grad():
        batch_loss, _ = model(waveforms, labels, mask=mask, attention_mask=~padding[:, None, None, :], lengths=lengths)
        alone = [model(waveforms[i : i + 1, :n], labels[i : i + 1, : frames[i]], mask=mask[i : i + 1, : frames[i]],
                       attention_mask=None)[0] for i, n in enumerate(lengths)]  # fmt: skip
    assert_close(batch_loss, torch.cat(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("frontend", "extractor_mode"), [("conv", "group_norm"), ("conv", "layer_norm"),
                                                          ("log_mel", "group_norm")])  # fmt: skip
def test_a_files_layer_outputs_are_the_same_alone_and_inside_a_padded_batch_of_other_lengths(frontend, extractor_mode):
    # The group-norm extractor normalises conv layer 0 over time; padded frames would also leak into the positional
    # convolution and the attention of the file's own frames without the mask made from `lengths`.
    model = seeded(HuBERT, tiny(frontend=frontend, extractor_mode=extractor_mode)).eval()
    waveforms, lengths = zero_padded([16_123, 9_731, 400, 12_800])
    with torch.no_grad():
        batch = model.get_intermediate_outputs(waveforms, lengths=lengths, before_residual=False)
        for i, n in enumerate(lengths.tolist()):
            alone = model.get_intermediate_outputs(waveforms[i : i + 1, :n], before_residual=False)
            assert int(model.frame_mask(lengths, waveforms.shape[1])[i].sum()) == alone[0].shape[1] == model_frames(n)
            for layer, (padded, own) in enumerate(zip(batch, alone, strict=True)):
                assert_close(padded[i, : own.shape[1]], own[0], msg=lambda m, at=(i, layer): f"file, layer {at}: {m}")


def test_the_gpu_path_normalises_conv_layer_0_over_each_files_own_frames_like_the_cpu_path_alone():
    # On a CPU a padded batch goes through the group-norm extractor one file at a time; elsewhere in one pass.
    model = seeded(HuBERT, tiny()).train()
    waveforms, lengths = zero_padded([16_123, 9_731, 400, 12_800])
    found = {}
    for name, path in (("batch", model._group_norm_per_waveform), ("alone", model._one_by_one)):
        model.zero_grad()
        features = path(waveforms, lengths)
        features.pow(2).sum().backward()
        found[name] = features.detach(), [p.grad.clone() for p in model.feature_extractor.parameters()]
    assert_close(found["batch"][0], found["alone"][0])
    for batched, alone in zip(found["batch"][1], found["alone"][1], strict=True):
        assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_a_padded_batch_of_waveforms_shorter_than_the_receptive_field_is_refused():
    waveforms, lengths = zero_padded([8_000, 399])
    with pytest.raises(ValueError, match="399 samples: at least 400"):
        HuBERT(tiny()).eval().get_intermediate_outputs(waveforms, lengths=lengths)
