"""The MFCC in torch operations, on any device: `features.mfcc_batch`'s path on GPU (it also runs on CPU, where the
tests check it against the reference).

The frames of the whole batch form one matrix (utterances laid out at multiples of the frame shift) that goes
through DC removal, pre-emphasis, window, rfft, mel filterbank, log and DCT as a few large operations, by chunks of
rows; then Δ and ΔΔ by gathers within each utterance.
"""

import functools
from typing import TYPE_CHECKING, NamedTuple

from hubert_pipeline.kaldi import (
    DELTA_WINDOW,
    DIM,
    FFT_SIZE,
    FLOAT32_EPSILON,
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

MEL_BLOCK = 16  # mel bands per filterbank matmul
CHUNK_ROWS = 65_536  # frames per FFT chunk: large enough for few kernel launches, buffers of ~200 MB at most


class _Constants(NamedTuple):
    window: "torch.Tensor"  # (400,) povey window
    banks: tuple[tuple[slice, "torch.Tensor"], ...]  # mel filterbank blocks: (rows of the power spectrum, (K, 16))
    dct_lifter: "torch.Tensor"  # (23, 13)


@functools.cache
def _constants(device: str) -> _Constants:
    """The window, filterbank and DCT of the torch path (GPU), on `device`.

    The filterbank applies to the interleaved (re², im²) of each FFT bin (its rows are doubled), and is split in two
    blocks of 16 bands (the second one padded with zero columns), each over the FFT bins its bands cover: 16-column
    matmuls are MKL's fastest here, 1.5x faster than one (514, 23) matmul.
    """
    import torch

    interleaved = mel_banks().t().repeat_interleave(2, dim=0)  # (514, 23)
    blocks = []
    for first in range(0, NUM_MEL_BINS, MEL_BLOCK):
        block = interleaved[:, first : first + MEL_BLOCK]
        used = block.any(dim=1).nonzero().flatten()
        rows = slice(int(used[0]), int(used[-1]) + 1)
        padded = torch.nn.functional.pad(block[rows], (0, MEL_BLOCK - block.shape[1]))
        blocks.append((rows, padded.contiguous().to(device)))
    return _Constants(povey_window().to(device), tuple(blocks), dct_lifter().to(device))


def _layout(waveforms: list["torch.Tensor"], device: "torch.device") -> tuple["torch.Tensor", list[int], list[int]]:
    """Concatenate a batch so that every frame of every utterance starts at a multiple of SHIFT.

    Utterance i starts at sample 160 * first[i] of the returned flat waveform (zero gaps between utterances), so
    `flat.as_strided((rows, 400), (160, 1))` frames the whole batch at once; its rows first[i] ... first[i] + counts[i]
    - 1 are the frames of utterance i, and the few rows that straddle two utterances are computed and dropped.
    """
    import torch

    counts = [num_frames(w.shape[0]) for w in waveforms]
    starts = [0]  # in samples: each utterance's slot is its length rounded up to a multiple of SHIFT
    for w in waveforms:
        starts.append(starts[-1] + -(-w.shape[0] // SHIFT) * SHIFT)
    flat = torch.empty(starts[-1], dtype=torch.float32, device=device)
    for w, start, end in zip(waveforms, starts, starts[1:], strict=False):
        flat[start : start + w.shape[0]] = w
        flat[start + w.shape[0] : end] = 0.0  # the gap before the next one
    return flat, [start // SHIFT for start in starts[:-1]], counts


def _log_mel(flat: "torch.Tensor", rows: int, chunk_rows: int) -> "torch.Tensor":
    """(rows, 23) log mel energies of the frames flat[160 r : 160 r + 400], r < rows (kaldi fbank, use_power).

    kaldi removes each frame's mean c, pre-emphasizes (s[j] - 0.97 s[j-1], s[-1] := s[0]) and windows. As the povey
    window w is 0 at j = 0, that is w[j] (x[j] - 0.97 x[j-1] - 0.03 c): the pre-emphasis is done once on the whole
    waveform (not on 2.5 overlapping copies of it) and each frame's sum is that of 5 sums of 80 samples. The frames
    then go through rfft, power and filterbank by chunks of rows that stay in cache, into preallocated buffers.
    """
    import torch

    window, banks, _ = _constants(str(flat.device))
    emphasized = torch.empty_like(flat)
    emphasized[0] = 0.0  # only ever multiplied by w[0] = 0
    torch.sub(flat[1:], flat[:-1], alpha=PREEMPHASIS, out=emphasized[1:])
    # frame r = half-shifts 2r ... 2r + 4 (400 = 5 x 80 samples): its sum is that of 5 half-shift sums
    halves = flat.view(-1, SHIFT // 2).sum(dim=1)
    sums = halves.unfold(0, WINDOW * 2 // SHIFT, 2)[:rows].sum(dim=1)
    offsets = sums * ((1 - PREEMPHASIS) / WINDOW)  # 0.03 c, (rows,)
    frames = emphasized.as_strided((rows, WINDOW), (SHIFT, 1))  # (rows, 400) view, no copy

    chunk_rows = min(chunk_rows, rows)
    padded = torch.empty(chunk_rows, FFT_SIZE, device=flat.device)
    padded[:, WINDOW:] = 0.0  # stays 0
    mel = [torch.empty(rows, MEL_BLOCK, device=flat.device) for _ in banks]
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        signal = padded[:n, :WINDOW]
        torch.sub(frames[start : start + n], offsets[start : start + n, None], out=signal)
        signal.mul_(window)
        spectrum = torch.fft.rfft(padded[:n])  # (with out=, the FFT writes a temporary and copies it)
        power = torch.view_as_real(spectrum).square_().view(n, 2 * (FFT_SIZE // 2 + 1))  # re², im² interleaved
        for (bins, block), out in zip(banks, mel, strict=True):
            torch.mm(power[:, bins], block, out=out[start : start + n])
    return torch.cat(mel, dim=1)[:, :NUM_MEL_BINS].clamp_min(FLOAT32_EPSILON).log_()


def _deltas(features: "torch.Tensor", starts: "torch.Tensor", ends: "torch.Tensor") -> "torch.Tensor":
    """compute_deltas(win_length=5, mode="replicate") along the rows of each utterance of a concatenated batch.

    `starts` / `ends` give, for every row, the first and last row of its utterance.
    """
    import torch

    rows = torch.arange(features.shape[0], device=features.device)
    total = torch.zeros_like(features)
    for k in range(1, DELTA_WINDOW + 1):
        after = features.index_select(0, torch.minimum(rows + k, ends))
        before = features.index_select(0, torch.maximum(rows - k, starts))
        total.add_(after - before, alpha=k)
    denominator = DELTA_WINDOW * (DELTA_WINDOW + 1) * (2 * DELTA_WINDOW + 1) / 3
    return total.div_(denominator)


def mfcc_tensors(waveforms: list["torch.Tensor"], device: "torch.device", chunk_rows: int) -> list["torch.Tensor"]:
    """`features.mfcc_batch` of float waveforms, in torch operations on `device`."""
    import torch

    flat, first, counts = _layout([w.to(device=device, dtype=torch.float32) for w in waveforms], device)
    if sum(counts) == 0:
        return [torch.zeros(0, DIM, device=device) for _ in waveforms]
    rows = max(f + c for f, c in zip(first, counts, strict=True))
    log_mel = _log_mel(flat, rows, chunk_rows)  # (rows, 23), including rows that straddle two utterances
    valid = torch.cat([torch.arange(f, f + c, device=device) for f, c in zip(first, counts, strict=True)])
    ceps = log_mel.index_select(0, valid) @ _constants(str(device)).dct_lifter  # (M, 13)

    lengths = torch.tensor(counts, device=device)
    ends = lengths.cumsum(0)
    row_starts = (ends - lengths).repeat_interleave(lengths)
    row_ends = (ends - 1).repeat_interleave(lengths)
    deltas = _deltas(ceps, row_starts, row_ends)
    ddeltas = _deltas(deltas, row_starts, row_ends)
    features = torch.cat([ceps, deltas, ddeltas], dim=1)  # (M, 39)
    return list(features.split(counts))
