"""The MFCC on CPU: compiled kernels (numba) around torch's rfft (MKL), chunk by chunk.

`features.mfcc_batch` comes here on CPU. For a chunk of frames of the whole batch:

    frames    DC removal, pre-emphasis and povey window of each 400-sample frame, into a zero-padded (n, 512) buffer
    rfft      torch.fft.rfft (MKL), the one step that stays in torch
    mel       power spectrum and 23 triangular mel bands, each summed over its own FFT bins only (about 480 products
              per frame, where a dense (257, 23) filterbank matmul does 5911)

then log and DCT (torch, vectorized) on the whole batch, and Δ / ΔΔ per utterance (a kernel). Each pass reads its input
once, the chunk's buffers stay in cache, and every kernel releases the GIL (nogil), so worker threads run them side
by side. 16-bit PCM goes in as int16: frames are computed on the integers and scaled by 2^-15 at the end, exactly
what scaling first would give (a power of two commutes with float rounding), without a float copy of the audio.

Kernels compile on first use (about a second) and are cached by numba (next to this file, or in the user's cache).
"""

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

from hubert_pipeline.audio import PCM16_SCALE, as_float32
from hubert_pipeline.kaldi import (
    DELTA_ORDERS,
    DIM,
    FFT_SIZE,
    FLOAT32_EPSILON,
    NUM_CEPS,
    NUM_MEL_BINS,
    PREEMPHASIS,
    SHIFT,
    WINDOW,
    dct_lifter,
    mel_banks,
    num_frames,
    povey_window,
)

if TYPE_CHECKING:
    import torch

CHUNK_ROWS = 512  # frames per rfft chunk: the (512, 512) buffer and its spectrum (2 MB) stay in L2

# reassociation (vectorized sums) and fused multiply-add; no assumption about NaN or infinities
FASTMATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _frames(samples: np.ndarray, starts: np.ndarray, window: np.ndarray, scale: np.float32, out: np.ndarray) -> None:
    """out[i, :400] = window * (pre-emphasized frame i without its mean) * scale; frame i = samples[starts[i]:][:400].

    kaldi: y = x - mean(x); y[j] - 0.97 y[j-1] (y[-1] := y[0]); times the window. As the povey window is 0 at j = 0,
    that is w[j] (x[j] - 0.97 x[j-1] - 0.03 mean(x)) for j >= 1, and 0 at j = 0. out[:, 400:] is left as it is (0).
    """
    a = np.float32(PREEMPHASIS)
    mean_weight = np.float32((1.0 - PREEMPHASIS) / WINDOW)
    w = window[1:]
    for i in range(starts.shape[0]):
        x = samples[starts[i] : starts[i] + WINDOW]
        total = np.float32(0.0)
        for j in range(x.shape[0]):
            total += np.float32(x[j])
        offset = mean_weight * total
        current, previous, o = x[1:], x[:-1], out[i, 1:WINDOW]
        for j in range(o.shape[0]):
            o[j] = w[j] * (np.float32(current[j]) - a * np.float32(previous[j]) - offset) * scale
        out[i, 0] = 0.0


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _mel(spectrum: np.ndarray, first: np.ndarray, width: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """out[i, m] = Σ_j weights[m, j] spectrum[i, first[m] + j]² for j < width[m].

    `spectrum` is the rfft as interleaved (re, im) floats, (n, 514); band m's weights are doubled (re², im² of each
    bin), so that each band is one contiguous, vectorized dot product, without a power-spectrum pass.
    """
    for i in range(spectrum.shape[0]):
        s, o = spectrum[i], out[i]
        for m in range(first.shape[0]):
            x = s[first[m] : first[m] + width[m]]
            wm = weights[m, : width[m]]
            total = np.float32(0.0)
            for j in range(x.shape[0]):
                total += wm[j] * x[j] * x[j]
            o[m] = total


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _deltas(c: np.ndarray, bounds: np.ndarray, out: np.ndarray) -> None:
    """out[t] = (c[t+1] - c[t-1] + 2 (c[t+2] - c[t-2])) / 10 within each utterance (rows bounds[u] to bounds[u+1]),
    edges replicated: torchaudio's compute_deltas(win_length=5)."""
    two, ten = np.float32(2.0), np.float32(10.0)
    for u in range(bounds.shape[0] - 1):
        start, end = bounds[u], bounds[u + 1]
        for t in range(start, end):
            after1, after2 = c[min(t + 1, end - 1)], c[min(t + 2, end - 1)]
            before1, before2 = c[max(t - 1, start)], c[max(t - 2, start)]
            o = out[t]
            for j in range(o.shape[0]):
                o[j] = (after1[j] - before1[j] + two * (after2[j] - before2[j])) / ten


class _Bands(NamedTuple):
    first: np.ndarray  # (23,) first interleaved spectrum float of each band
    width: np.ndarray  # (23,) interleaved floats of each band
    weights: np.ndarray  # (23, max width) doubled weights, zero-padded


@functools.cache
def _bands() -> _Bands:
    """Each mel band as its contiguous run of nonzero weights, over the interleaved (re, im) spectrum."""
    banks = mel_banks().numpy()  # (23, 257)
    first = np.empty(NUM_MEL_BINS, np.int64)
    width = np.empty(NUM_MEL_BINS, np.int64)
    for m, bank in enumerate(banks):
        nonzero = np.flatnonzero(bank)
        first[m], width[m] = 2 * nonzero[0], 2 * (nonzero[-1] - nonzero[0] + 1)
    weights = np.zeros((NUM_MEL_BINS, int(width.max())), np.float32)
    for m, bank in enumerate(banks):
        weights[m, : width[m]] = np.repeat(bank[first[m] // 2 :][: width[m] // 2], 2)
    return _Bands(first, width, weights)


def append_deltas(features: np.ndarray, bounds: np.ndarray, orders: int = DELTA_ORDERS) -> None:
    """In place: the columns after the first c = dim / (orders + 1) become Δ of the c before them, then ΔΔ, per
    utterance (rows bounds[u] to bounds[u + 1]). `features` (frames, dim) float32, C-ordered: the layout the kernel
    was compiled for, so that a store's Δ computed on read equal the ones computed with the MFCC bit for bit."""
    c = features.shape[1] // (orders + 1)
    for k in range(orders):
        _deltas(features[:, k * c : (k + 1) * c], bounds, features[:, (k + 1) * c : (k + 2) * c])


def with_deltas(static: np.ndarray, orders: int = DELTA_ORDERS) -> np.ndarray:
    """(frames, c) static coefficients of one utterance (any float dtype) -> (frames, c x (orders + 1)) float32."""
    frames, c = static.shape
    out = np.empty((frames, c * (orders + 1)), np.float32)
    out[:, :c] = static
    append_deltas(out, np.array([0, frames], np.int64), orders)
    return out


def mfcc_arrays(
    waveforms: Sequence[np.ndarray], chunk_rows: int = CHUNK_ROWS, *, deltas: bool = True
) -> list["torch.Tensor"]:
    """39-d MFCC of many utterances on CPU: (samples,) float32 arrays in [-1, 1], or int16 PCM arrays, ->
    (frames, 39) float32 tensors (views of one (frames of all, 39) tensor); with `deltas` False the 13 static
    coefficients only ((frames, 13) views of the same tensor: the same values)."""
    import torch

    counts = [num_frames(w.shape[0]) for w in waveforms]
    total = sum(counts)
    if total == 0:
        return [torch.zeros(0, DIM if deltas else NUM_CEPS) for _ in waveforms]
    if all(w.dtype == np.int16 for w in waveforms):
        samples, scale = np.concatenate(waveforms), np.float32(PCM16_SCALE)
    else:  # int16 ones scaled exactly, as load_audio does
        samples, scale = np.concatenate([as_float32(w) for w in waveforms]), np.float32(1.0)
    lengths = np.array([w.shape[0] for w in waveforms], np.int64)
    frame_counts = np.array(counts, np.int64)
    bounds = np.concatenate([[0], np.cumsum(frame_counts)])
    # sample offset of every frame: its utterance's start + 160 x its index in the utterance
    first_frame = np.repeat(bounds[:-1], frame_counts)
    starts = np.repeat(np.cumsum(lengths) - lengths, frame_counts) + SHIFT * (np.arange(total) - first_frame)

    window, bands = povey_window().numpy(), _bands()
    chunk_rows = max(1, min(chunk_rows, total))
    padded = torch.zeros(chunk_rows, FFT_SIZE)  # columns 400-511 stay 0
    mel = np.empty((total, NUM_MEL_BINS), np.float32)
    for start in range(0, total, chunk_rows):
        n = min(chunk_rows, total - start)
        _frames(samples, starts[start : start + n], window, scale, padded.numpy())
        spectrum = torch.view_as_real(torch.fft.rfft(padded[:n])).numpy().reshape(n, -1)  # (n, 514)
        _mel(spectrum, *bands, mel[start : start + n])

    features = torch.empty(total, DIM)
    log_mel = torch.from_numpy(mel).clamp_min_(FLOAT32_EPSILON).log_()
    torch.mm(log_mel, dct_lifter(), out=features[:, :NUM_CEPS])
    if not deltas:
        return list(features[:, :NUM_CEPS].split(counts))
    append_deltas(features.numpy(), bounds)
    return list(features.split(counts))
