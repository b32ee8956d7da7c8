"""Audio files and manifests: the one file-id function, probing, manifest writing and audio loading.

A manifest is spidr's CSV format: `fileid,path,num_samples` for files in a folder, plus
`archive,byte_offset,byte_size` for files inside an uncompressed tar archive. Every file is probed before it
enters a manifest: undecodable, empty, non-16 kHz or multi-channel files are reported by path, and either fail
the stage (default) or are skipped and listed in a separate CSV.
"""

from __future__ import annotations  # polars only where it is used: audio loading works without it

import io
import logging
import tarfile
import wave
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from hubert_pipeline.io import atomic_path

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import polars as pl
    import torch

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
PCM16_SCALE = 2.0**-15  # int16 PCM -> [-1, 1): x * 2^-15 is exactly x / 32768 in float32
MANIFEST_COLUMNS = ("fileid", "path", "num_samples")
ARCHIVE_COLUMNS = ("archive", "byte_offset", "byte_size")


def file_id(path: str | Path) -> str:
    """THE file id of an audio file: its name without extension (`19-198-0001`, the demo's `kal-s100_train_00003`).

    Every stage keys features, units and alignments by this function, never by the path.
    """
    return PurePosixPath(str(path)).name.rsplit(".", 1)[0]


class BadAudioError(ValueError):
    """An audio file that cannot enter a manifest; the message names it."""


@dataclass(frozen=True)
class AudioSource:
    path: str  # file path, or member name inside `archive`
    archive: str | None = None
    byte_offset: int | None = None
    byte_size: int | None = None

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path

    def read_source(self) -> str | bytes:
        if self.archive is None:
            return self.path
        from spidr.data.utils import bytes_from_archive

        assert self.byte_offset is not None
        assert self.byte_size is not None
        return bytes_from_archive(self.archive, self.byte_offset, self.byte_size)


def _decoder(source: AudioSource):  # noqa: ANN202
    from torchcodec.decoders import AudioDecoder, WavDecoder

    data = source.read_source()
    return (WavDecoder if source.path.endswith(".wav") else AudioDecoder)(data)


def probe(source: AudioSource) -> int:
    """Number of samples of a valid file; BadAudioError naming the file when it is unusable for HuBERT."""
    try:
        decoder = _decoder(source)
        metadata = decoder.metadata
        sample_rate, channels = metadata.sample_rate, metadata.num_channels
        if sample_rate != SAMPLE_RATE:
            raise BadAudioError(f"{source}: sample rate {sample_rate} Hz, expected {SAMPLE_RATE} Hz")
        if channels != 1:
            raise BadAudioError(f"{source}: {channels} channels, expected mono")
        duration = metadata.duration_seconds_from_header
        # no length in the header: decode it
        samples = decoder.get_all_samples().data.shape[-1] if duration is None else round(duration * sample_rate)
    except BadAudioError:
        raise
    except Exception as e:
        raise BadAudioError(f"{source}: cannot be decoded ({type(e).__name__}: {e})") from e
    if samples <= 0:
        raise BadAudioError(f"{source}: empty (0 samples)")
    return samples


def _pcm_wav(source: AudioSource) -> tuple[bytes, int, int] | None:
    """(little-endian int16 samples, sample rate, channels) of a 16-bit PCM WAV, read with the standard library;
    None for anything else (the decoder then reads it, or reports it). Per file, FFmpeg's decoder costs tens of
    milliseconds; this costs tens of microseconds, and gives the same samples (tests/test_audio.py)."""
    if not source.path.endswith(".wav"):
        return None
    try:
        data = source.read_source()
        with io.BytesIO(data) if isinstance(data, bytes) else Path(data).open("rb") as f, wave.open(f) as w:
            if w.getsampwidth() != 2 or w.getcomptype() != "NONE":  # noqa: PLR2004
                return None
            frames, expected = w.readframes(w.getnframes()), w.getnframes() * w.getnchannels() * 2
            rate, channels = w.getframerate(), w.getnchannels()
    except (wave.Error, EOFError, OSError, ValueError):
        return None
    if len(frames) != expected:  # truncated: let the decoder decide what it can read
        return None
    return frames, rate, channels


def _check_format(source: AudioSource, rate: int, channels: int) -> None:
    if rate != SAMPLE_RATE or channels != 1:
        raise BadAudioError(f"{source}: expected mono {SAMPLE_RATE} Hz, got {channels} channel(s) at {rate} Hz")


def load_samples(source: AudioSource) -> np.ndarray:
    """The samples as stored, shape (samples,), checked to be 16 kHz mono: int16 for a 16-bit PCM WAV (read, not
    decoded), float32 in [-1, 1] for anything else (decoded)."""
    if (pcm := _pcm_wav(source)) is not None:
        import numpy as np

        frames, rate, channels = pcm
        _check_format(source, rate, channels)
        return np.frombuffer(frames, "<i2")
    try:
        samples = _decoder(source).get_all_samples()
    except Exception as e:  # the decoder's message does not name the file
        raise BadAudioError(f"{source}: cannot be decoded ({type(e).__name__}: {e})") from e
    _check_format(source, samples.sample_rate, samples.data.shape[0])
    return samples.data[0].numpy()


def as_float32(samples: np.ndarray) -> np.ndarray:
    """int16 PCM scaled to [-1, 1) in one pass (exactly), float samples as float32."""
    import numpy as np

    if samples.dtype == np.int16:
        return np.multiply(samples, np.float32(PCM16_SCALE), dtype=np.float32)
    return samples.astype(np.float32, copy=False)


def load_audio(source: AudioSource) -> torch.Tensor:
    """The waveform as float32 in [-1, 1], shape (samples,), checked to be 16 kHz mono."""
    import torch

    return torch.from_numpy(as_float32(load_samples(source)))


def source_of(row: dict) -> AudioSource:
    """The AudioSource of a manifest row (a dict from `DataFrame.iter_rows(named=True)`)."""
    if row.get("archive"):
        return AudioSource(row["path"], row["archive"], int(row["byte_offset"]), int(row["byte_size"]))
    return AudioSource(row["path"])


def discover(root: str | Path, extension: str) -> Iterator[tuple[str, AudioSource]]:
    """(file id, source) of every audio file under a folder, or inside an uncompressed tar archive, sorted by path."""
    root = Path(root)
    if root.is_dir():
        for path in sorted(root.resolve().rglob(f"*{extension}")):
            yield file_id(path), AudioSource(str(path))
    elif root.is_file() and tarfile.is_tarfile(root):
        with tarfile.open(root, mode="r:") as tar:  # "r:" refuses compressed archives
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith(extension)), key=lambda m: m.name
            )
        for m in members:
            yield file_id(m.name), AudioSource(m.name, str(root.resolve()), m.offset_data, m.size)
    elif root.is_file():
        raise ValueError(f"{root}: not a folder or an uncompressed tar archive")
    else:
        raise FileNotFoundError(f"{root}: no such folder or archive")


def _probe_one(item: tuple[str, AudioSource]) -> tuple[str, AudioSource, int | str]:
    fileid, source = item
    try:
        return fileid, source, probe(source)
    except BadAudioError as e:
        return fileid, source, str(e)


def build_manifest(
    root: str | Path,
    *,
    extension: str = ".wav",
    on_bad_file: Literal["fail", "skip"] = "fail",
    workers: int = 1,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Probe every file under `root`: (manifest sorted by file id, skipped files with their reason).

    With on_bad_file="fail", BadAudioError lists every bad file (up to 20) before anything is written.
    """
    from concurrent.futures import ThreadPoolExecutor

    import polars as pl
    from tqdm import tqdm

    items = list(discover(root, extension))
    if not items:
        raise ValueError(f"{root}: no '{extension}' files found")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(_probe_one, items), total=len(items), desc=f"probe {root}", mininterval=2))
    good = [(fid, src, n) for fid, src, n in results if isinstance(n, int)]
    bad = [(fid, str(src), reason) for fid, src, reason in results if isinstance(reason, str)]
    for _, _, reason in bad:
        logger.warning("bad audio file: %s", reason)
    if bad and on_bad_file == "fail":
        listing = "\n  ".join(reason for _, _, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""  # noqa: PLR2004
        raise BadAudioError(
            f"{len(bad)} bad audio file(s) under {root} "
            f"(set manifest.on_bad_file: skip to leave them out):\n  {listing}{more}"
        )
    ids = [fid for fid, _, _ in good]
    if len(set(ids)) != len(ids):
        seen: dict[str, str] = {}
        for fid, src, _ in good:
            if fid in seen:
                raise ValueError(
                    f"{root}: file id {fid!r} is given by both {seen[fid]} and {src}; file ids must be unique"
                )
            seen[fid] = str(src)
    has_archive = any(src.archive for _, src, _ in good)
    rows = [
        {
            "fileid": fid,
            "path": src.path,
            "num_samples": n,
            **(
                {"archive": src.archive, "byte_offset": src.byte_offset, "byte_size": src.byte_size}
                if has_archive
                else {}
            ),
        }
        for fid, src, n in good
    ]
    schema = {"fileid": pl.String, "path": pl.String, "num_samples": pl.Int64}
    if has_archive:
        schema |= {"archive": pl.String, "byte_offset": pl.Int64, "byte_size": pl.Int64}
    manifest = pl.DataFrame(rows, schema=schema).sort("fileid")
    skipped = pl.DataFrame(bad, schema={"fileid": pl.String, "path": pl.String, "reason": pl.String}, orient="row")
    return manifest, skipped


def read_manifest(path: str | Path) -> pl.DataFrame:
    """Read a manifest (CSV or JSONL) and check its columns, naming the file when they are wrong."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    df = pl.read_ndjson(path) if path.suffix == ".jsonl" else pl.read_csv(path)
    if missing := [c for c in MANIFEST_COLUMNS if c not in df.columns]:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    return df


def write_csv(df: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.write_csv(tmp)
