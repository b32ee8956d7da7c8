"""Model FLOPs of a training step from the configuration, and the dense bf16 peaks that turn them into MFU.

Counted: the multiply-adds of matrix products and convolutions (2 FLOPs each), as MFU is usually counted (PaLM,
nanoGPT); norms, activations, softmax, dropout and the optimizer are left out. Forward, for a (B, T) batch:

    conv extractor  sum over layers of 2 C_in C_out k T_out          (log-mel: rfft and mel matmul, no backward)
    projection      2 C D per frame
    pos. conv       2 (D / groups) D K per frame                      (K = pos_conv_kernel)
    transformer     L (8 D^2 + 4 D F + 4 T D) per frame               (q, k, v, out; feed-forward; QK^T and AV)
    head            (2 D d + 2 d C) per masked frame                  (final_proj, logits over C classes)

A training step is forward + backward = 3 x forward (the backward computes gradients of inputs and weights; the
first conv layer's input needs none, a 0.1 % overcount). HuBERT Base (fairseq's layout) gives 4.2e10 FLOPs per
second of audio for 2 s crops, 4.3e10 for 5 s, 4.6e10 for 15.6 s (the attention's T grows with the crop): the
"about 4.4e10" usually quoted. The log-mel front end saves a third (2.8e10 at 5 s). The forward count equals
torch.utils.flop_counter's on the model (tests/test_flops.py).
"""

from hubert_pipeline.audio import SAMPLE_RATE
from hubert_pipeline.model_config import N_FFT, HubertConfig, conv_frames

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets. Matched in order against
# torch.cuda.get_device_name(): the first key found in the name wins.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,  # H200 SXM (same compute as H100 SXM)
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # H100 SXM
    "A100": 312e12,  # SXM and PCIe
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (torch.cuda.get_device_name()); None when not in the table (CPU)."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def forward_flops(cfg: HubertConfig, num_classes: int, *, batch: int, samples: int, masked_frames: int) -> float:
    """FLOPs of one forward of HuBERTPretrain on a (batch, samples) waveform batch with `masked_frames` predicted."""
    frames = conv_frames(samples, cfg.conv_layers)
    if cfg.frontend == "log_mel":
        spectra = 2 * frames  # 10 ms frames
        front = spectra * (5 * N_FFT * (N_FFT.bit_length() - 1) + 2 * (N_FFT // 2 + 1) * cfg.mel_bins)
        channels = 2 * cfg.mel_bins
    else:
        front, length, in_channels = 0, samples, 1
        for out_channels, kernel, stride in cfg.conv_layers:
            length = max((length - kernel) // stride + 1, 0)
            front += 2 * in_channels * out_channels * kernel * length
            in_channels = out_channels
        channels = in_channels
    d, f, layers = cfg.encoder_embed_dim, cfg.encoder_ff_interm_features, cfg.encoder_num_layers
    per_frame = 2 * channels * d  # feature projection
    per_frame += 2 * (d // cfg.pos_conv_groups) * d * cfg.pos_conv_kernel  # positional convolution
    per_frame += layers * (8 * d * d + 4 * d * f + 4 * frames * d)  # transformer layers
    head = masked_frames * (2 * d * cfg.final_dim + 2 * cfg.final_dim * num_classes)
    return float(batch * (front + frames * per_frame) + head)


def train_step_flops(cfg: HubertConfig, num_classes: int, *, batch: int, samples: int, masked_frames: int) -> float:
    """FLOPs of forward and backward (3 x forward) of one micro-batch."""
    flops = forward_flops(cfg, num_classes, batch=batch, samples=samples, masked_frames=masked_frames)
    return 3.0 * flops


def flops_per_audio_second(
    cfg: HubertConfig, num_classes: int = 500, *, utterance_seconds: float = 5.0, mask_fraction: float = 0.5
) -> float:
    """Training FLOPs per second of audio, for utterances of one length with `mask_fraction` of frames masked."""
    samples = round(utterance_seconds * SAMPLE_RATE)
    masked = round(mask_fraction * conv_frames(samples, cfg.conv_layers))
    return train_step_flops(cfg, num_classes, batch=1, samples=samples, masked_frames=masked) / utterance_seconds
