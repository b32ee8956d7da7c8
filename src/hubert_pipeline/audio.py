"""Audio files: the one file-id function, the one decoding path, and probing for the manifest stage.

Every format FFmpeg reads is decoded by FFmpeg (torchcodec's `AudioDecoder`), from a file or from a member of an
uncompressed tar archive. The one exception is 16-bit PCM WAV, read as int16 straight from its data chunk: the
same samples as FFmpeg's (tests/test_audio.py), a thousand times faster per file. torchcodec's `WavDecoder` is
never used: it misreads IEEE-float WAV (errors up to 0.56 on samples in [-1, 1]).

Probing gives a file's exact number of samples and refuses it, naming it, when it is unusable: undecodable,
empty, truncated (WAV: its data chunk is shorter than its header says; FLAC: its last frame is cut or ends before
STREAMINFO's total), not 16 kHz mono. WAV and FLAC lengths come from their headers, checked against the file;
other formats (MP3, Ogg, Opus, ...) are decoded, their headers only estimate the length; `verify="full"` decodes
every file, and checks a FLAC's samples against STREAMINFO's MD5 (FFmpeg conceals damaged frames).

Resampling and downmix are off by default: a file that is not 16 kHz mono is refused. A source with `resample`
(`downmix`) set is read at 16 kHz (mono) through FFmpeg's resampler (torchcodec's AudioDecoder `sample_rate`,
`num_channels`: the samples of `ffmpeg -ar 16000 -ac 1`); a file already 16 kHz mono is read as it is. The manifest
records each file's own rate and channels, so every stage that reads it (`source_of`) converts the same files the
same way, and its `num_samples` is the converted length (decoded, exact).
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from hubert_pipeline.audio_headers import (
    HEAD_BYTES,
    HeaderError,
    check_flac_end,
    decoded_md5,
    parse_flac,
    parse_wav,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torchcodec.decoders import AudioStreamMetadata

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
PCM16_SCALE = 2.0**-15  # int16 PCM -> [-1, 1): x * 2^-15 is exactly x / 32768 in float32
# Extensions `manifest.extension` accepts: formats FFmpeg reads that hold speech.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac", ".wma", ".aif", ".aiff",
                    ".au", ".snd", ".sph", ".caf", ".w64", ".webm", ".mka", ".amr", ".wv", ".ape", ".mp2")  # fmt: skip
Verify = Literal["header", "full"]


def file_id(path: str | os.PathLike) -> str:
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
    resample: bool = False  # read a file of another rate at 16 kHz (else refuse it)
    downmix: bool = False  # read a file of several channels as mono (else refuse it)

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path

    def size(self) -> int:
        return self.byte_size if self.byte_size is not None else Path(self.path).stat().st_size

    def read_bytes(self, start: int = 0, length: int | None = None) -> bytes:
        """`length` bytes (all, if None) from `start`, within the file or the archive member."""
        size = self.size()
        length = size - start if length is None else min(length, size - start)
        with Path(self.archive or self.path).open("rb") as f:
            f.seek((self.byte_offset or 0) + start)
            return f.read(max(0, length))

    def decoder_input(self) -> str | bytes:
        return self.path if self.archive is None else self.read_bytes()


def _decode(source: AudioSource) -> "torch.Tensor":
    """(channels, samples) float32 as FFmpeg decodes them; BadAudioError naming the file if it cannot."""
    return _decode_with_metadata(source)[0]


def _decode_with_metadata(source: AudioSource) -> tuple["torch.Tensor", "AudioStreamMetadata"]:
    """`_decode`, and the file's metadata: its own rate and channels, the duration its header gives (an estimate
    for MP3, Ogg, ...)."""
    from torchcodec.decoders import AudioDecoder

    try:
        decoder = AudioDecoder(source.decoder_input(), sample_rate=SAMPLE_RATE if source.resample else None,
                               num_channels=1 if source.downmix else None)  # fmt: skip
        metadata = decoder.metadata  # the file's own rate and channels
    except Exception as e:  # the decoder's message does not name the file
        raise BadAudioError(f"{source}: cannot be decoded ({type(e).__name__}: {e})") from e
    _check_format(source, metadata.sample_rate, metadata.num_channels)  # before decoding a file to refuse
    try:
        samples = decoder.get_all_samples()
    except Exception as e:
        raise BadAudioError(f"{source}: cannot be decoded ({type(e).__name__}: {e})") from e
    return samples.data, metadata


# A decode this much shorter than the header's estimate is a truncated file (or a misdecoded one: torchcodec 0.17
# keeps one frame per packet, dropping 3 blocks of 4 of ADPCM WAV; tests/test_audio.py): MP3 estimates include the
# encoder's delay and padding (about 0.1 s); a file cut anywhere but in its last quarter second is found.
ESTIMATE_SLACK_SECONDS, ESTIMATE_SLACK_FRACTION = 0.25, 0.01


def _check_format(source: AudioSource, rate: int | None, channels: int | None) -> None:
    """BadAudioError unless the file is 16 kHz mono, or is converted to it (`source.resample`, `source.downmix`)."""
    if (rate != SAMPLE_RATE and not source.resample) or (channels != 1 and not source.downmix):
        keys = [k for k, off in (("resample", rate != SAMPLE_RATE), ("downmix", channels != 1)) if off]
        raise BadAudioError(
            f"{source}: expected mono {SAMPLE_RATE} Hz, got {channels} channel(s) at {rate} Hz "
            f"(convert the corpus to 16 kHz mono, or set {' and '.join(f'manifest.{k}: true' for k in keys)})"
        )


def needs_conversion(rate: int | None, channels: int | None) -> bool:
    return rate != SAMPLE_RATE or channels != 1


def _header_error(source: AudioSource, kind: str, e: HeaderError) -> BadAudioError:
    return BadAudioError(f"{source}: {kind} {e}")


def load_samples(source: AudioSource) -> "np.ndarray":
    """The samples, shape (samples,), checked to be 16 kHz mono: int16 for a 16-bit PCM WAV (read, not decoded),
    float32 in [-1, 1] as FFmpeg decodes them for anything else."""
    import numpy as np

    head = source.read_bytes(0, HEAD_BYTES)
    try:
        wav = parse_wav(head, source.size())
    except HeaderError as e:
        raise _header_error(source, "WAV", e) from e
    if wav is not None and wav.is_pcm16 and not needs_conversion(wav.sample_rate, wav.channels):
        data = head[wav.data_offset : wav.data_offset + wav.data_size]
        if len(data) < wav.data_size:
            data = source.read_bytes(wav.data_offset, wav.data_size)
        return np.frombuffer(data, "<i2")
    return _decode(source)[0].numpy()


def as_float32(samples: "np.ndarray") -> "np.ndarray":
    """int16 PCM scaled to [-1, 1) in one pass (exactly), float samples as float32."""
    import numpy as np

    if samples.dtype == np.int16:
        return np.multiply(samples, np.float32(PCM16_SCALE), dtype=np.float32)
    return samples.astype(np.float32, copy=False)


def load_audio(source: AudioSource) -> "torch.Tensor":
    """The waveform as float32 in [-1, 1], shape (samples,), checked to be 16 kHz mono."""
    import torch

    return torch.from_numpy(as_float32(load_samples(source)))


@dataclass(frozen=True)
class Probe:
    num_samples: int  # as read: after resampling and downmix, if any
    sample_rate: int  # the file's own
    channels: int


def _header_probe(source: AudioSource, head: bytes) -> Probe | None:
    """Exact samples from a WAV or FLAC header, checked against the file; None for other formats (or a FLAC
    whose encoder did not know its length, or a file to convert: its converted length is decoded); BadAudioError
    for a truncated file or a format that is not 16 kHz mono (and not converted)."""
    try:
        wav = parse_wav(head, source.size())
    except HeaderError as e:
        raise _header_error(source, "WAV", e) from e
    if wav is not None:
        _check_format(source, wav.sample_rate, wav.channels)
        found = Probe(wav.num_frames, wav.sample_rate, wav.channels) if wav.uncompressed else None
    else:
        try:
            flac = parse_flac(head)
            if flac is None:
                return None
            _check_format(source, flac.sample_rate, flac.channels)
            check_flac_end(flac, source)
        except HeaderError as e:
            raise _header_error(source, "FLAC", e) from e
        found = Probe(flac.total_samples, flac.sample_rate, flac.channels) if flac.total_samples else None
    return None if found is None or needs_conversion(found.sample_rate, found.channels) else found


def probe(source: AudioSource, verify: Verify = "header") -> int:
    """Number of samples of a valid file, as read; BadAudioError naming the file when it is unusable for HuBERT."""
    return probe_format(source, verify).num_samples


def probe_format(source: AudioSource, verify: Verify = "header") -> Probe:
    """`probe`, with the file's own rate and channels."""
    try:
        head = source.read_bytes(0, HEAD_BYTES)
    except OSError as e:
        raise BadAudioError(f"{source}: cannot be read ({e})") from e
    found = _header_probe(source, head)
    if found is None or verify == "full":
        found = _decoded_probe(source, found, head)
    if found.num_samples <= 0:
        raise BadAudioError(f"{source}: empty (0 samples)")
    return found


def _check_flac_md5(source: AudioSource, head: bytes, data: "torch.Tensor") -> None:
    """BadAudioError when a FLAC's decoded samples do not have STREAMINFO's MD5: FFmpeg conceals a damaged frame
    (same length, wrong samples), the MD5 does not."""
    try:
        flac = parse_flac(head)
    except HeaderError:
        return
    if flac is None or not any(flac.md5) or flac.bits > 24 or needs_conversion(flac.sample_rate, flac.channels):  # noqa: PLR2004  float32 holds 24 bits
        return
    if decoded_md5(data.numpy(), flac.bits) != flac.md5:
        raise BadAudioError(f"{source}: FLAC decoded samples do not match STREAMINFO's MD5 (damaged inside)")


def _decoded_probe(source: AudioSource, from_header: Probe | None, head: bytes) -> Probe:
    data, metadata = _decode_with_metadata(source)
    _check_flac_md5(source, head, data)
    decoded, estimate = data.shape[-1], metadata.duration_seconds_from_header
    if from_header is not None and decoded != from_header.num_samples:
        raise BadAudioError(f"{source}: its header says {from_header.num_samples} samples, {decoded} decode")
    shortest = (estimate or 0) * (1 - ESTIMATE_SLACK_FRACTION) - ESTIMATE_SLACK_SECONDS
    if from_header is None and decoded / SAMPLE_RATE < shortest:
        raise BadAudioError(
            f"{source}: its header says about {estimate:.2f} s, only {decoded / SAMPLE_RATE:.2f} s decode "
            "(truncated or damaged; or a codec whose packets hold several frames, such as ADPCM in WAV, of which "
            "torchcodec keeps only the first: convert such files once with the ffmpeg CLI, e.g. to FLAC)"
        )
    if from_header is not None:
        return from_header
    return Probe(decoded, metadata.sample_rate or SAMPLE_RATE, metadata.num_channels or 1)


def source_of(row: dict) -> AudioSource:
    """The AudioSource of a manifest row (a dict from `DataFrame.iter_rows(named=True)`): converted to 16 kHz
    (mono) when the row's `sample_rate` (`channels`) says the file is not."""
    resample = int(row.get("sample_rate") or SAMPLE_RATE) != SAMPLE_RATE
    downmix = int(row.get("channels") or 1) != 1
    if row.get("archive"):
        return AudioSource(row["path"], row["archive"], int(row["byte_offset"]), int(row["byte_size"]),
                           resample=resample, downmix=downmix)  # fmt: skip
    return AudioSource(row["path"], resample=resample, downmix=downmix)
