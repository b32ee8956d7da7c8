"""Audio files: the one file-id function, the one decoding path, and probing for the manifest stage.

Every format FFmpeg reads is decoded by FFmpeg (torchcodec's `AudioDecoder`), from a file or from a member of an
uncompressed tar archive. The one exception is 16-bit PCM WAV, read as int16 straight from its data chunk: the
same samples as FFmpeg's (tests/test_audio.py), a thousand times faster per file. torchcodec's `WavDecoder` is
never used: it misreads IEEE-float WAV (errors up to 0.56 on samples in [-1, 1]).

Probing gives a file's exact number of samples and refuses it, naming it, when it is unusable: undecodable,
empty, truncated (WAV: its data chunk is shorter than its header says; FLAC: its last frame is cut or ends before
STREAMINFO's total), not 16 kHz mono. WAV and FLAC lengths come from their headers, checked against the file;
other formats (MP3, Ogg, Opus, ...) are decoded, their headers only estimate the length; `verify="full"` decodes
every file.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from hubert_pipeline.audio_headers import HEAD_BYTES, HeaderError, check_flac_end, parse_flac, parse_wav

if TYPE_CHECKING:
    import numpy as np
    import torch

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
    return _decode_with_estimate(source)[0]


def _decode_with_estimate(source: AudioSource) -> tuple["torch.Tensor", float | None]:
    """`_decode`, and the duration the container's header gives (an estimate for MP3, Ogg, ...), if any."""
    from torchcodec.decoders import AudioDecoder

    try:
        decoder = AudioDecoder(source.decoder_input())
        samples = decoder.get_all_samples()
    except Exception as e:  # the decoder's message does not name the file
        raise BadAudioError(f"{source}: cannot be decoded ({type(e).__name__}: {e})") from e
    _check_format(source, samples.sample_rate, samples.data.shape[0])
    return samples.data, decoder.metadata.duration_seconds_from_header


# A decode this much shorter than the header's estimate is a truncated file: MP3 estimates include the encoder's
# delay and padding (about 0.1 s); a file cut anywhere but in its last quarter second is found.
ESTIMATE_SLACK_SECONDS, ESTIMATE_SLACK_FRACTION = 0.25, 0.01


def _check_format(source: AudioSource, rate: int, channels: int) -> None:
    if rate != SAMPLE_RATE or channels != 1:
        raise BadAudioError(
            f"{source}: expected mono {SAMPLE_RATE} Hz, got {channels} channel(s) at {rate} Hz "
            "(convert the corpus to 16 kHz mono)"
        )


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
    if wav is not None and wav.is_pcm16:
        _check_format(source, wav.sample_rate, wav.channels)
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


def _header_length(source: AudioSource, head: bytes) -> int | None:
    """Exact samples from a WAV or FLAC header, checked against the file; None for other formats (or a FLAC
    whose encoder did not know its length); BadAudioError for a truncated file or a format that is not 16 kHz mono."""
    try:
        wav = parse_wav(head, source.size())
    except HeaderError as e:
        raise _header_error(source, "WAV", e) from e
    if wav is not None:
        _check_format(source, wav.sample_rate, wav.channels)
        return wav.num_frames if wav.uncompressed else None
    try:
        flac = parse_flac(head)
        if flac is None:
            return None
        _check_format(source, flac.sample_rate, flac.channels)
        check_flac_end(flac, source)
    except HeaderError as e:
        raise _header_error(source, "FLAC", e) from e
    return flac.total_samples or None


def probe(source: AudioSource, verify: Verify = "header") -> int:
    """Number of samples of a valid file; BadAudioError naming the file when it is unusable for HuBERT."""
    try:
        head = source.read_bytes(0, HEAD_BYTES)
    except OSError as e:
        raise BadAudioError(f"{source}: cannot be read ({e})") from e
    samples = _header_length(source, head)
    if samples is None or verify == "full":
        data, estimate = _decode_with_estimate(source)
        decoded = data.shape[-1]
        if samples is not None and decoded != samples:
            raise BadAudioError(f"{source}: its header says {samples} samples, {decoded} decode")
        shortest = (estimate or 0) * (1 - ESTIMATE_SLACK_FRACTION) - ESTIMATE_SLACK_SECONDS
        if samples is None and decoded / SAMPLE_RATE < shortest:
            raise BadAudioError(
                f"{source}: its header says about {estimate:.2f} s, only {decoded / SAMPLE_RATE:.2f} s decode "
                "(truncated or damaged)"
            )
        samples = decoded
    if samples <= 0:
        raise BadAudioError(f"{source}: empty (0 samples)")
    return samples


def source_of(row: dict) -> AudioSource:
    """The AudioSource of a manifest row (a dict from `DataFrame.iter_rows(named=True)`)."""
    if row.get("archive"):
        return AudioSource(row["path"], row["archive"], int(row["byte_offset"]), int(row["byte_size"]))
    return AudioSource(row["path"])
