"""Sharded feature store: few files, memory-mappable, written atomically, resumable shard by shard.

Layout of a store folder:

    shard-00000.npy    (frames, dim) array of every file of shard 0, concatenated (plain .npy, no pickle)
    shard-00000.json   that shard's index: [[fileid, offset, length], ...]; written after the .npy, so it marks
                       the shard complete (a rerun or a requeued array task skips complete shards)
    index.parquet      fileid -> shard, offset, length (rows of its shard array), for the whole store
    meta.json          dim, dtype, frame_rate, counts, deltas; written last: a store without it is incomplete

A store may hold static coefficients only (MFCC: 13 of 39 columns, `deltas: 2`): reads return the features with
their Δ (and ΔΔ) computed per file, as float32; the shards hold dim / (deltas + 1) columns.

Shards are the unit of parallel work: a local worker or a SLURM array task computes one shard at a time.
"""

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from hubert_pipeline.io import atomic_path, write_json

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16")


class IncompleteStoreError(RuntimeError):
    """The store folder has no meta.json: it was never finished."""


@dataclass(frozen=True)
class StoreMeta:
    dim: int
    dtype: str
    frame_rate: float  # frames per second
    num_shards: int
    num_files: int
    num_frames: int
    deltas: int = 0  # Δ orders computed per file on read (MFCC: 2); the shards hold dim / (deltas + 1) columns

    @property
    def stored_dim(self) -> int:
        return self.dim // (self.deltas + 1)


def shard_path(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard:05d}.npy"


def shard_index_path(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard:05d}.json"


def is_shard_complete(root: str | Path, shard: int) -> bool:
    return shard_index_path(root, shard).is_file() and shard_path(root, shard).is_file()


def assign_shards(manifest: pl.DataFrame, num_shards: int) -> pl.DataFrame:
    """Add a `shard` column: contiguous runs of the manifest (sorted by fileid), balanced by num_samples.

    Deterministic: the same manifest and shard count always give the same assignment, on any machine.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    df = manifest.sort("fileid")
    total = max(int(df["num_samples"].sum()), 1)
    cumulative = df["num_samples"].cum_sum() - df["num_samples"]
    shard = (cumulative * num_shards // total).clip(0, num_shards - 1).cast(pl.Int32)
    return df.with_columns(shard.alias("shard"))


def write_shard(
    root: str | Path,
    shard: int,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    dtype: str,
    dim: int,
) -> int:
    """Write one shard from (fileid, (frames, dim) array) pairs; return its number of frames.

    Each array is streamed into the .npy as it comes (memory: one file's features, not the shard's); the header,
    written first for 0 rows, is rewritten in place for the final row count. The file is byte for byte the
    `np.save` of the concatenated arrays: numpy pads the header for in-place growth of the first axis.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    root = Path(root)
    index: list[tuple[str, int, int]] = []
    offset = 0
    with atomic_path(shard_path(root, shard)) as tmp, tmp.open("wb") as f:
        header_length = _write_npy_header(f, rows=0, dim=dim, dtype=dtype)
        for fileid, array in items:
            if array.ndim != 2 or array.shape[1] != dim:  # noqa: PLR2004
                raise ValueError(f"features of {fileid!r} have shape {array.shape}, expected (frames, {dim})")
            f.write(np.ascontiguousarray(array, dtype=dtype).data)
            index.append((fileid, offset, int(array.shape[0])))
            offset += int(array.shape[0])
        f.seek(0)
        if _write_npy_header(f, rows=offset, dim=dim, dtype=dtype) != header_length:
            raise RuntimeError("numpy changed the .npy header's length with the row count: update write_shard")
    write_json(shard_index_path(root, shard), index)
    return offset


def _write_npy_header(f: BinaryIO, *, rows: int, dim: int, dtype: str) -> int:
    """The .npy (version 1.0) header `np.save` writes for a C-ordered (rows, dim) array; return its length."""
    start = f.tell()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, dim)}
    np.lib.format.write_array_header_1_0(f, header)
    return f.tell() - start


def finalize_store(
    root: str | Path, *, num_shards: int, dim: int, dtype: str, frame_rate: float, deltas: int = 0
) -> StoreMeta:
    """Check every shard is complete, write index.parquet then meta.json (which marks the store complete).

    `dim`: the features' columns as read; with `deltas`, the shards hold dim / (deltas + 1) of them."""
    if dim % (deltas + 1):
        raise ValueError(f"dim {dim} is not a multiple of deltas + 1 = {deltas + 1}")
    root = Path(root)
    if missing := [s for s in range(num_shards) if not is_shard_complete(root, s)]:
        raise IncompleteStoreError(f"{root}: shards {missing[:10]} are missing or incomplete")
    rows: list[tuple[str, int, int, int]] = []
    for s in range(num_shards):
        rows.extend(
            (fileid, s, offset, length) for fileid, offset, length in json.loads(shard_index_path(root, s).read_text())
        )
    index = pl.DataFrame(
        rows, schema={"fileid": pl.String, "shard": pl.Int32, "offset": pl.Int64, "length": pl.Int64}, orient="row"
    )
    if (dup := index.filter(pl.col("fileid").is_duplicated())).height:
        raise ValueError(f"{root}: file id {dup['fileid'][0]!r} appears in several shards")
    with atomic_path(root / "index.parquet") as tmp:
        index.write_parquet(tmp)
    meta = StoreMeta(
        dim=dim,
        dtype=dtype,
        frame_rate=frame_rate,
        num_shards=num_shards,
        num_files=index.height,
        num_frames=int(index["length"].sum()),
        deltas=deltas,
    )
    write_json(root / "meta.json", asdict(meta))
    return meta


class FeatureStore:
    """Read-only view of a finished store; shards are memory-mapped on first use."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise IncompleteStoreError(f"{self.root}: not a finished feature store (no meta.json)")
        self.meta = StoreMeta(**json.loads(meta_path.read_text()))
        self.index = pl.read_parquet(self.root / "index.parquet")
        self._rows = {fileid: (shard, offset, length) for fileid, shard, offset, length in self.index.iter_rows()}
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.index.height

    def __contains__(self, fileid: str) -> bool:
        return fileid in self._rows

    @property
    def fileids(self) -> list[str]:
        return self.index["fileid"].to_list()

    def shard(self, shard: int) -> np.ndarray:
        """The shard's stored columns, memory-mapped (without the Δ a store of static coefficients adds on read)."""
        if shard not in self._shards:
            self._shards[shard] = np.load(shard_path(self.root, shard), mmap_mode="r", allow_pickle=False)
        return self._shards[shard]

    def get(self, fileid: str) -> np.ndarray:
        """The (frames, dim) features of one file: a read-only memory-mapped view, or for a store of static
        coefficients a float32 array with their Δ computed (`StoreMeta.deltas`)."""
        try:
            shard, offset, length = self._rows[fileid]
        except KeyError:
            raise KeyError(f"{self.root}: no features for file id {fileid!r}") from None
        stored = self.shard(shard)[offset : offset + length]
        if not self.meta.deltas:
            return stored
        from hubert_pipeline.mfcc_cpu import with_deltas

        return with_deltas(stored, self.meta.deltas)

    def iter_chunks(self, fileids: Iterable[str] | None = None, *, chunk_frames: int) -> Iterator[np.ndarray]:
        """Yield float32 arrays of at most `chunk_frames` rows covering the given files (all by default), in order.

        Memory stays bounded by the chunk size whatever the size of the store.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        buffer: list[np.ndarray] = []
        filled = 0
        for fileid in self.fileids if fileids is None else fileids:
            features = self.get(fileid)
            start = 0
            while start < len(features):
                take = min(chunk_frames - filled, len(features) - start)
                buffer.append(features[start : start + take])
                filled += take
                start += take
                if filled == chunk_frames:
                    yield np.concatenate(buffer).astype(np.float32, copy=False)
                    buffer, filled = [], 0
        if filled:
            yield np.concatenate(buffer).astype(np.float32, copy=False)

    def sample_fileids(self, fraction: float, *, seed: int) -> list[str]:
        """A seeded random subset of ceil(fraction * files) file ids, in store order."""
        n = max(1, math.ceil(fraction * len(self)))
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(self), size=min(n, len(self)), replace=False))
        ids = self.fileids
        return [ids[i] for i in chosen]
