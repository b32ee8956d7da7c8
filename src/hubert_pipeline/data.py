"""Waveforms and units for pretraining: aligned crops, padding masks, seeded masks, a resumable batch order.

Randomness of a batch (its crops and its masks) comes from a generator seeded by (seed, epoch, batch number), not
from worker processes: the same batch is identical whatever the number of workers or processes, after a resume,
and, for validation, for every checkpoint. The batch order is spidr's bucketing sampler, reshuffled by epoch; a
resumed run skips the batches already seen in its epoch, so it sees the order an uninterrupted run would.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spidr.config import MaskingConfig
from spidr.data.dataset import BucketizeBatchSampler
from spidr.data.masks import MaskGenerator
from spidr.models.components import mask_from_index
from torch import Tensor
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from hubert_pipeline.audio import SAMPLE_RATE, load_audio, source_of
from hubert_pipeline.io import project_root
from hubert_pipeline.model_config import FAIRSEQ_CONV_LAYERS, conv_frames

STRIDE = 320  # samples per model frame: crops start on frame boundaries, so labels stay exactly aligned


def model_frames(num_samples: int) -> int:
    """Frames (50 Hz) of the conv extractor for `num_samples` (`units.model_frames`, without numpy or polars)."""
    return conv_frames(num_samples, FAIRSEQ_CONV_LAYERS)


@dataclass(frozen=True)
class Batch:
    waveforms: Tensor  # (B, T) float32
    labels: Tensor  # (B, F) int64, -1 on padding
    attention_mask: Tensor | None  # (B, 1, 1, F) bool, True = attend; None without padding
    mask: Tensor  # (B, F) bool, True = masked frame (never on padding)
    audio_seconds: float
    lengths: Tensor | None = None  # (B,) samples of each waveform; None without padding
    masked_frames: int = -1  # mask.sum(), counted where the batch is made (on the host): -1 counts it

    def __post_init__(self) -> None:
        if self.masked_frames < 0:  # a sync if the mask is on a GPU already: the collator counts on the CPU
            object.__setattr__(self, "masked_frames", int(self.mask.sum()))

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.waveforms.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True),
            self.mask.to(device, non_blocking=True),
            self.audio_seconds,
            None if self.lengths is None else self.lengths.to(device, non_blocking=True),
            masked_frames=self.masked_frames,
        )


def read_labeled_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest with units (JSONL written by the units stage); clear error naming the file.

    Read line by line; each row's units become an int16 array (int32 if a unit is negative or above 32767): a list
    of ints takes 8 bytes a unit (28 more per int object), and its pages are copied into every data-loading worker as
    the reference counts change. Memory: 2 bytes per unit, 20 ms of audio: 0.36 MB per audio hour per process.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest with units")
    root = project_root(path)
    with path.open(encoding="utf-8") as f:
        rows = [_labeled_row(line, root) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty manifest")
    if missing := {"fileid", "path", "num_samples", "units"} - set(rows[0]):
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    return rows


def compact_units(values: Any) -> np.ndarray:
    """Units as int16 (2 bytes a unit, any k up to 32768), int32 where one is negative or larger."""
    units = np.asarray(values, dtype=np.int32)
    fits = not units.size or (units.min() >= 0 and units.max() <= np.iinfo(np.int16).max)
    return units.astype(np.int16) if fits else units


def _labeled_row(line: str, root: Path | None) -> dict:
    row = json.loads(line)
    if "units" in row:
        row["units"] = compact_units(row["units"])
    key = "archive" if row.get("archive") else "path"
    if root is not None and not row[key].startswith("/"):
        row[key] = str(root / row[key])  # named relative to its project's folder (manifest.relative_sources)
    return row


class LabeledSpeech(Dataset):
    """(global batch number, waveform, units) of a manifest with units; indexed by (batch number, row)."""

    def __init__(self, rows: list[dict], *, normalize: bool) -> None:
        self.rows = rows
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: tuple[int, int]) -> tuple[int, Tensor, Tensor]:
        batch_number, position = index  # the sampler yields (batch number, row)
        row = self.rows[position]
        waveform = load_audio(source_of(row))
        if self.normalize:
            waveform = F.layer_norm(waveform, waveform.shape)
        return batch_number, waveform, torch.as_tensor(row["units"], dtype=torch.long)


def crop(waveform: Tensor, units: Tensor, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random crop of `length` samples starting on a frame boundary, and exactly its units."""
    length = min(length, waveform.numel())
    max_start = (waveform.numel() - length) // STRIDE
    start = int(torch.randint(max_start + 1, (1,), generator=generator)) if max_start > 0 else 0
    frames = model_frames(length)
    return waveform[start * STRIDE : start * STRIDE + length], units[start : start + frames]


class Collator:
    def __init__(self, masking: MaskingConfig, *, seed: int, max_sample_size: int, pad_audio: bool) -> None:
        self.mask_generator = MaskGenerator(masking)
        self.seed = seed
        self.max_sample_size = max_sample_size
        self.pad_audio = pad_audio
        self.epoch = 0

    def __call__(self, items: list[tuple[int, Tensor, Tensor]]) -> Batch:
        batch_number = items[0][0]
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, batch_number)) % 2**62)
        lengths = [w.numel() for _, w, _ in items]
        target = min(max(lengths) if self.pad_audio else min(lengths), self.max_sample_size)
        crops = [crop(w, u, target, generator) for _, w, u in items]
        waveforms = pad_sequence([w for w, _ in crops], batch_first=True)
        labels = pad_sequence([u for _, u in crops], batch_first=True, padding_value=-1)
        frames = torch.tensor([model_frames(w.numel()) for w, _ in crops])
        padding = torch.arange(labels.shape[1]).expand(len(items), -1) >= frames[:, None]
        mask = mask_from_index(self.mask_generator(padding, generator=generator)[0], labels.shape[1]) & ~padding
        padded = bool(padding.any())
        attention_mask = ~padding[:, None, None, :] if padded else None
        lengths = torch.tensor([w.numel() for w, _ in crops]) if padded else None
        return Batch(waveforms, labels, attention_mask, mask, sum(w.numel() for w, _ in crops) / SAMPLE_RATE, lengths)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """spidr's bucketing batches, shuffled per epoch; rank r of W takes batches r, r+W, ...; skippable on resume.

    Yields lists of (global batch number, row) so the collator can seed the batch's crops and masks.
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        max_batch_samples: int,
        min_sample_size: int,
        max_sample_size: int,
        num_buckets: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        self.sampler = BucketizeBatchSampler(
            lengths=lengths,
            num_buckets=num_buckets,
            min_len=min_sample_size,
            max_len=max_sample_size,
            max_token_count=max_batch_samples,
            batch_size=None,
            seed=seed,
            bucket_method="percentile",
            shuffle=shuffle,
            drop_last=False,
        )
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.group = world_size * accumulate  # batches per optimizer step, over all processes
        self.epoch, self.skip = 0, 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        """Order of `epoch`; the first `skip` batches of this rank are left out (they were seen before a resume)."""
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler.iter_list)
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            batches = [batches[i] for i in perm]
        usable = len(batches) - len(batches) % self.group  # every step of every rank gets full micro-batches
        self.all_batches = batches[:usable]  # of every rank, this epoch
        self.batches = [(n, batches[n]) for n in range(self.rank, usable, self.world_size)]

    def __len__(self) -> int:
        return len(self.batches) - self.skip

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def audio_used(self, lengths: list[int], *, max_sample_size: int, pad_audio: bool) -> float:
        """Fraction of the audio of `lengths` this epoch's batches (all ranks) train on, after cropping.

        Without pad_audio every file of a batch is cropped to the shortest (fairseq's default), and files shorter
        than min_sample_size never train: batches of files of near-equal length waste least.
        """
        used = 0
        for batch in self.all_batches:
            sizes = [min(lengths[i], max_sample_size) for i in batch]
            used += sum(sizes) if pad_audio else min(sizes) * len(sizes)
        return used / max(sum(lengths), 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, rows in self.batches[self.skip :]:
            yield [(number, row) for row in rows]


def build_loader(
    rows: list[dict],
    *,
    masking: MaskingConfig,
    max_batch_samples: int,
    min_sample_size: int,
    max_sample_size: int,
    num_buckets: int,
    seed: int,
    shuffle: bool,
    normalize: bool,
    pad_audio: bool,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
) -> tuple[DataLoader, ResumableBatchSampler, Collator]:
    lengths = [int(r["num_samples"]) for r in rows]
    if not any(min_sample_size <= n for n in lengths):
        raise ValueError(
            f"no file is at least {min_sample_size} samples long (min_sample_size); longest is {max(lengths)}"
        )
    sampler = ResumableBatchSampler(
        lengths,
        max_batch_samples=max_batch_samples,
        min_sample_size=min_sample_size,
        max_sample_size=max_sample_size,
        num_buckets=max(1, min(num_buckets, math.ceil(len(rows) / 2))),
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        accumulate=accumulate,
    )
    collator = Collator(masking, seed=seed, max_sample_size=max_sample_size, pad_audio=pad_audio)
    loader = DataLoader(
        LabeledSpeech(rows, normalize=normalize),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler, collator
