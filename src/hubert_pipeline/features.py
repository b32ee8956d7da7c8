"""39-d MFCC features (13 kaldi MFCC + Δ + ΔΔ, 100 Hz), batched, into a sharded feature store.

`mfcc(waveform)` equals minimal_hubert's `features.mfcc` (torchaudio's `compliance.kaldi.mfcc` with kaldi defaults,
then `functional.compute_deltas` twice) within float32 rounding. `mfcc_batch(waveforms)` computes many utterances at
once: the frames of the whole batch go through DC removal, pre-emphasis, window, rfft, mel filterbank, log and DCT
chunk by chunk, on CPU in compiled kernels around torch's rfft (`hubert_pipeline.mfcc_cpu`), on GPU as a few large
torch operations. torchaudio is not imported: the window, filterbank and DCT matrices are rebuilt with the
float32 operations of `torchaudio.compliance.kaldi` (`hubert_pipeline.kaldi`, with the constants).

The store holds the 13 static coefficients; Δ and ΔΔ are computed per file when it is read (`StoreMeta.deltas`),
by the same kernel, so that the features read equal `mfcc_batch`'s bit for bit: a third of the bytes to write, to
hash (DVC) and to keep (18 GB at 960 h, where 39 columns took 54 GB).

    python -m hubert_pipeline.features data/manifests/train.csv data/mfcc/train --num-shards 8 --workers 2
"""

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubert_pipeline.kaldi import DELTA_ORDERS, DIM, FRAME_RATE, NUM_CEPS, SAMPLE_RATE, num_frames

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    import torch

    from hubert_pipeline.params import ExecutionParams, MfccParams
    from hubert_pipeline.store import StoreMeta

__all__ = ["DIM", "FRAME_RATE", "SAMPLE_RATE", "extract_mfcc", "mfcc", "mfcc_batch", "num_frames"]

logger = logging.getLogger(__name__)


def mfcc_batch(
    waveforms: "Sequence[torch.Tensor | np.ndarray]",
    *,
    device: "str | torch.device | None" = None,
    chunk_rows: int | None = None,
    deltas: bool = True,
) -> list["torch.Tensor"]:
    """39-d MFCC of many utterances: (samples,) waveforms -> (frames, 39) float32 tensors on `device`; with
    `deltas` False, (frames, 13): the static coefficients only (the feature store's: `store.StoreMeta.deltas`).

    A waveform is float in [-1, 1], or int16 16-bit PCM (scaled by 2^-15), as a tensor or a numpy array. `device`
    defaults to that of the first waveform (CPU for arrays). An utterance shorter than one window (400 samples)
    gives (0, 39). On CPU, compiled kernels around torch's rfft compute it (`hubert_pipeline.mfcc_cpu`); on GPU,
    torch operations (`hubert_pipeline.mfcc_torch`). `chunk_rows` frames at a time go through the FFT (default:
    512 on CPU, to stay in cache; 65536 on GPU).
    """
    import numpy as np
    import torch

    from hubert_pipeline.audio import PCM16_SCALE, as_float32

    for i, w in enumerate(waveforms):
        if w.ndim != 1:
            raise ValueError(f"waveform {i} has shape {tuple(w.shape)}, expected (samples,)")
        is_float = w.is_floating_point() if isinstance(w, torch.Tensor) else np.issubdtype(w.dtype, np.floating)
        if not is_float and w.dtype not in (np.int16, torch.int16):
            raise ValueError(f"waveform {i} has dtype {w.dtype}, expected float in [-1, 1] or int16 PCM")
    first_device = waveforms[0].device if waveforms and isinstance(waveforms[0], torch.Tensor) else "cpu"
    device = torch.device(device if device is not None else first_device)
    if device.type == "cpu":
        from hubert_pipeline.mfcc_cpu import CHUNK_ROWS, mfcc_arrays

        arrays = [w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else w for w in waveforms]
        arrays = [a if a.dtype == np.int16 else a.astype(np.float32, copy=False) for a in arrays]
        return mfcc_arrays(arrays, chunk_rows or CHUNK_ROWS, deltas=deltas)
    from hubert_pipeline.mfcc_torch import CHUNK_ROWS, mfcc_tensors

    tensors = [torch.tensor(as_float32(w)) if isinstance(w, np.ndarray) else w for w in waveforms]  # w may be read-only
    tensors = [t.to(device, torch.float32) * PCM16_SCALE if t.dtype == torch.int16 else t for t in tensors]
    features = mfcc_tensors(tensors, device, chunk_rows or CHUNK_ROWS)
    return features if deltas else [f[:, :NUM_CEPS] for f in features]


def mfcc(waveform: "torch.Tensor") -> "torch.Tensor":
    """39-d MFCC of one utterance: (samples,) -> (frames, 39), frames = 1 + (samples - 400) // 160 (0 if shorter)."""
    return mfcc_batch([waveform])[0]


def _batches(rows: list[dict[str, Any]], batch_samples: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive groups of manifest rows of about `batch_samples` samples (at least one row each)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += int(row["num_samples"])
        if size >= batch_samples:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _resumable_frames(root: Path, shard: int, fileids: list[str], dtype: str) -> int | None:
    """Frames of a complete shard written for exactly these files in this dtype; None when it must be (re)computed."""
    import json

    import numpy as np

    from hubert_pipeline.store import is_shard_complete, shard_index_path, shard_path

    if not is_shard_complete(root, shard):
        return None
    index = json.loads(shard_index_path(root, shard).read_text())
    array = np.load(shard_path(root, shard), mmap_mode="r", allow_pickle=False)
    same_files = [fileid for fileid, _, _ in index] == fileids
    if not same_files or array.dtype != np.dtype(dtype) or array.shape[1:] != (NUM_CEPS,):
        logger.warning("shard %d in %s was written for other files or settings: recomputing it", shard, root)
        return None
    return sum(length for _, _, length in index)


@functools.lru_cache(maxsize=4)
def _sharded_manifest(manifest: str, num_shards: int, stamp: tuple[int, int]) -> "pl.DataFrame":  # noqa: ARG001
    """The manifest with its shard column, read once for all the shards one process computes (`stamp`: the
    file's mtime and size, so that a changed manifest is read again)."""
    from hubert_pipeline.manifest import read_manifest
    from hubert_pipeline.store import assign_shards

    return assign_shards(read_manifest(manifest), num_shards)


def extract_mfcc_shard(
    manifest: str,
    root: str,
    *,
    shard: int,
    num_shards: int,
    dtype: str,
    batch_seconds: float,
    device: str = "cpu",
) -> int:
    """Compute and write one shard of the store (the files `assign_shards` gives it); return its number of frames.

    A shard already complete for the same files and dtype is left as it is (resume).
    """
    from hubert_pipeline.store import write_shard

    stat = Path(manifest).stat()
    rows = _sharded_manifest(manifest, num_shards, (stat.st_mtime_ns, stat.st_size)).filter(shard=shard).to_dicts()
    fileids = [row["fileid"] for row in rows]
    if (frames := _resumable_frames(Path(root), shard, fileids, dtype)) is not None:
        logger.info("shard %d of %s is complete: skipped", shard, root)
        return frames
    items = _features(rows, batch_samples=max(1, round(batch_seconds * SAMPLE_RATE)), dtype=dtype, device=device)
    frames = write_shard(root, shard, items, dtype=dtype, dim=NUM_CEPS)  # streamed: one batch in memory at a time
    logger.info("shard %d of %s: %d files, %d frames", shard, root, len(rows), frames)
    return frames


def _features(
    rows: list[dict[str, Any]], *, batch_samples: int, dtype: str, device: str
) -> Iterator[tuple[str, "np.ndarray"]]:
    """(file id, MFCC) of every row, in order, computed batch by batch."""
    from hubert_pipeline.audio import load_samples, source_of

    for batch in _batches(rows, batch_samples):
        waveforms = [load_samples(source_of(row)) for row in batch]  # int16 PCM: no float copy
        for row, waveform in zip(batch, waveforms, strict=True):
            if waveform.shape[0] != row["num_samples"]:
                logger.warning(
                    "%s: %d samples decoded, the manifest says %d", row["path"], waveform.shape[0], row["num_samples"]
                )
        features = mfcc_batch(waveforms, device=device, deltas=False)  # Δ and ΔΔ are computed on read
        for row, f in zip(batch, features, strict=True):
            yield row["fileid"], f.cpu().numpy().astype(dtype, copy=False)


def extract_mfcc(
    manifest: str | Path,
    root: str | Path,
    *,
    params: "MfccParams",
    execution: "ExecutionParams",
) -> "StoreMeta":
    """MFCC of every file of a manifest into a sharded feature store at `root` (one task per shard, resumable)."""
    from hubert_pipeline.kmeans import resolve_device
    from hubert_pipeline.launch import map_tasks
    from hubert_pipeline.store import finalize_store

    device = str(resolve_device(execution.device))
    tasks = [
        {
            "manifest": str(manifest),
            "root": str(root),
            "shard": shard,
            "num_shards": params.num_shards,
            "dtype": params.dtype,
            "batch_seconds": params.batch_seconds,
            "device": device,
        }
        for shard in range(params.num_shards)
    ]
    map_tasks(extract_mfcc_shard, tasks, execution=execution, desc="mfcc", threads=True)
    meta = finalize_store(
        root, num_shards=params.num_shards, dim=DIM, dtype=params.dtype, frame_rate=FRAME_RATE, deltas=DELTA_ORDERS
    )
    logger.info("%s: %d files, %d frames in %d shards", root, meta.num_files, meta.num_frames, meta.num_shards)
    return meta


if __name__ == "__main__":
    import argparse

    from hubert_pipeline.params import ExecutionParams, MfccParams

    defaults = MfccParams()
    parser = argparse.ArgumentParser(
        prog="python -m hubert_pipeline.features",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("manifest", help="manifest CSV (fileid,path,num_samples[,archive,byte_offset,byte_size])")
    parser.add_argument("store", help="folder of the feature store to write")
    parser.add_argument("--num-shards", type=int, default=defaults.num_shards, help="shards of the store")
    parser.add_argument("--dtype", choices=["float32", "float16"], default=defaults.dtype, help="stored dtype")
    parser.add_argument("--batch-seconds", type=float, default=defaults.batch_seconds, help="audio per batch")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute")
    parser.add_argument(
        "--shard",
        type=int,
        help="compute this shard only (a SLURM array task: slurm/mfcc.sbatch); without it, missing shards are "
        "computed and the store is sealed (index, meta.json)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SLURM workers unpickle the library's functions, not __main__'s
    from hubert_pipeline.features import extract_mfcc as extract  # ty: ignore[missing-module-member]
    from hubert_pipeline.features import extract_mfcc_shard  # ty: ignore[missing-module-member]
    from hubert_pipeline.kmeans import resolve_device

    if args.shard is not None:
        if not 0 <= args.shard < args.num_shards:
            parser.error(f"--shard {args.shard} is not in [0, --num-shards {args.num_shards})")
        extract_mfcc_shard(
            manifest=args.manifest, root=args.store, shard=args.shard, num_shards=args.num_shards, dtype=args.dtype,
            batch_seconds=args.batch_seconds, device=str(resolve_device(args.device)),
        )  # fmt: skip
        raise SystemExit(0)
    extract(
        args.manifest,
        args.store,
        params=MfccParams(num_shards=args.num_shards, dtype=args.dtype, batch_seconds=args.batch_seconds),
        execution=ExecutionParams(workers=args.workers, device=args.device),
    )
