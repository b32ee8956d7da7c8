"""kaldi's MFCC constants and matrices (compute-mfcc-feats defaults at 16 kHz), shared by the MFCC implementations.

`hubert_pipeline.features` (the public MFCC and the feature store), `mfcc_cpu` (compiled kernels) and `mfcc_torch`
(torch operations, GPU) all import from here, and features dispatches to the two others: no import circle.
The window, filterbank and DCT matrices are the float32 operations of `torchaudio.compliance.kaldi`, rebuilt here
(torchaudio is not imported).
"""

import functools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# kaldi defaults (compute-mfcc-feats; torchaudio.compliance.kaldi.mfcc), at 16 kHz
SAMPLE_RATE = 16_000
WINDOW = 400  # 25 ms (--frame-length)
SHIFT = 160  # 10 ms (--frame-shift), snip_edges=True
FFT_SIZE = 512  # window rounded up to a power of two (--round-to-power-of-two)
PREEMPHASIS = 0.97  # --preemphasis-coefficient
NUM_MEL_BINS = 23  # --num-mel-bins
LOW_FREQ = 20.0  # --low-freq; high freq = Nyquist
NUM_CEPS = 13  # --num-ceps
CEPSTRAL_LIFTER = 22.0  # --cepstral-lifter
DELTA_WINDOW = 2  # compute_deltas(win_length=5): Δ[t] = Σ_k k (c[t+k] - c[t-k]) / (2 Σ_k k²), edges replicated
DELTA_ORDERS = 2  # Δ and ΔΔ
DIM = (DELTA_ORDERS + 1) * NUM_CEPS  # 39
FRAME_RATE = SAMPLE_RATE / SHIFT  # 100 Hz
FLOAT32_EPSILON = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, kaldi's floor on mel energies


def num_frames(num_samples: int) -> int:
    """Frames of an utterance of `num_samples` samples (snip_edges=True): 0 when shorter than one window."""
    return 0 if num_samples < WINDOW else 1 + (num_samples - WINDOW) // SHIFT


@functools.cache
def povey_window() -> "torch.Tensor":
    """(400,) float32: kaldi's povey window, hann^0.85 (torchaudio's `_feature_window_function`)."""
    import torch

    return torch.hann_window(WINDOW, periodic=False).pow(0.85)


@functools.cache
def mel_banks() -> "torch.Tensor":
    """(23, 257) float32 triangular mel filterbank over the rfft bins (the Nyquist bin has weight 0).

    The float32 operations of torchaudio's `get_mel_banks`, so that it is bit for bit the reference's.
    """
    import torch

    def mel_scale(freq: float) -> float:
        return 1127.0 * math.log(1.0 + freq / 700.0)

    mel_low, mel_high = mel_scale(LOW_FREQ), mel_scale(0.5 * SAMPLE_RATE)
    mel_delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    bins = torch.arange(NUM_MEL_BINS).unsqueeze(1)
    left = mel_low + bins * mel_delta  # (23, 1)
    center = mel_low + (bins + 1.0) * mel_delta
    right = mel_low + (bins + 2.0) * mel_delta
    mel = 1127.0 * (1.0 + (SAMPLE_RATE / FFT_SIZE) * torch.arange(FFT_SIZE / 2) / 700.0).log()  # (256,)
    mel = mel.unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))  # (23, 256)
    return torch.nn.functional.pad(banks, (0, 1))  # (23, 257)


@functools.cache
def dct_lifter() -> "torch.Tensor":
    """(23, 13) float32: DCT-II with kaldi's first column (torchaudio's `_get_dct_matrix`), times the cepstral
    lifter (`_get_lifter_coeffs`)."""
    import torch

    n = torch.arange(float(NUM_MEL_BINS))
    k = torch.arange(float(NUM_MEL_BINS)).unsqueeze(1)
    dct = torch.cos(math.pi / float(NUM_MEL_BINS) * (n + 0.5) * k)  # (23, 23), torchaudio create_dct "ortho"
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / float(NUM_MEL_BINS))
    dct = dct.t()
    dct[:, 0] = math.sqrt(1 / float(NUM_MEL_BINS))
    dct = dct[:, :NUM_CEPS]
    lifter = 1.0 + 0.5 * CEPSTRAL_LIFTER * torch.sin(math.pi * torch.arange(NUM_CEPS) / CEPSTRAL_LIFTER)
    return (dct * lifter.unsqueeze(0)).contiguous()
