"""What the headers of WAV and FLAC files say, checked against the bytes the file holds: exact lengths, no decoding.

WAV: the RIFF (or RF64) chunks give the sample format and the data chunk's size; the audio is truncated when the
data chunk claims more bytes than the file holds. For uncompressed codecs (PCM, IEEE float, A-law, mu-law, and
the same inside WAVE_FORMAT_EXTENSIBLE) the number of samples is exactly the data size over the frame size.

FLAC: STREAMINFO gives the total number of samples; the file is complete when its last frame (found from the end,
its header CRC-8 and frame CRC-16 both right) ends exactly there. A file cut anywhere inside its audio fails one
of the two. Reading the header and the last few kilobytes costs microseconds, where decoding costs milliseconds.
"""

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_ALAW = 6
WAVE_FORMAT_MULAW = 7
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
UNCOMPRESSED_WAV = (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_ALAW, WAVE_FORMAT_MULAW)
UNKNOWN_SIZE = 0xFFFFFFFF  # a WAV written to a pipe: the data runs to the end of the file
HEAD_BYTES = 1 << 16  # enough for the header of any WAV or FLAC file but one with huge metadata (cover art)


class HeaderError(ValueError):
    """The header contradicts the file: truncated, cut short or inconsistent. The message says how."""


class ByteSource(Protocol):
    def read_bytes(self, start: int = 0, length: int | None = None) -> bytes: ...
    def size(self) -> int: ...


@dataclass(frozen=True)
class WavHeader:
    format_tag: int  # the codec; for WAVE_FORMAT_EXTENSIBLE, its sub-format's
    channels: int
    sample_rate: int
    bits: int
    block_align: int
    data_offset: int
    data_size: int

    @property
    def uncompressed(self) -> bool:
        return self.format_tag in UNCOMPRESSED_WAV and self.block_align > 0

    @property
    def is_pcm16(self) -> bool:
        """16-bit PCM: read as int16 directly (tests/test_audio.py: exactly FFmpeg's samples)."""
        return self.format_tag == WAVE_FORMAT_PCM and self.bits == 16 and self.block_align == 2 * self.channels  # noqa: PLR2004

    @property
    def num_frames(self) -> int:
        return self.data_size // self.block_align


def _chunks(head: bytes, start: int) -> list[tuple[bytes, int, int]]:
    """(id, offset of its body, declared size) of the RIFF chunks in `head`, up to and including 'data'."""
    chunks, pos = [], start
    while pos + 8 <= len(head):
        cid, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        chunks.append((cid, pos + 8, size))
        if cid == b"data":
            break
        pos += 8 + size + (size & 1)
    return chunks


def parse_wav(head: bytes, file_size: int) -> WavHeader | None:
    """The header of a RIFF/RF64 WAVE file from its first bytes; None if it is not one, or if its fmt and data
    chunks are not in `head` (FFmpeg then reads it); HeaderError if its data chunk claims more than the file holds."""
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":  # noqa: PLR2004
        return None
    chunks = {cid: (offset, size) for cid, offset, size in _chunks(head, 12)}
    if b"fmt " not in chunks or b"data" not in chunks:
        return None
    fmt_offset, fmt_size = chunks[b"fmt "]
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", head, fmt_offset)
    if tag == WAVE_FORMAT_EXTENSIBLE and fmt_size >= 40:  # noqa: PLR2004  cbSize 22: ..., then the sub-format GUID
        tag = struct.unpack_from("<H", head, fmt_offset + 24)[0]
    data_offset, data_size = chunks[b"data"]
    if head[:4] == b"RF64" and b"ds64" in chunks:  # 64-bit sizes: riff size, data size, sample count
        data_size = struct.unpack_from("<Q", head, chunks[b"ds64"][0] + 8)[0]
    elif data_size == UNKNOWN_SIZE:
        data_size = file_size - data_offset
    if data_offset + data_size > file_size:
        raise HeaderError(
            f"truncated: its header says {data_size} bytes of audio, the file holds {file_size - data_offset}"
        )
    header = WavHeader(tag, channels, rate, bits, block_align, data_offset, data_size)
    if header.uncompressed and data_size % block_align:
        raise HeaderError(f"{data_size} bytes of audio are not a whole number of {block_align}-byte frames")
    return header


# --- FLAC -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlacInfo:
    sample_rate: int
    channels: int
    bits: int
    total_samples: int  # 0: unknown (the encoder did not know it)
    max_block: int
    max_frame: int  # bytes; 0: unknown
    md5: bytes  # of the decoded samples (signed, little-endian, interleaved); zeros: not computed by the encoder
    audio_offset: int  # first frame


def _crc_table(poly: int, width: int) -> list[int]:
    top, mask, table = 1 << (width - 1), (1 << width) - 1, []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


_CRC8, _CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)


def crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = _CRC8[crc ^ b]
    return crc


def crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ b]
    return crc


def parse_flac(head: bytes) -> FlacInfo | None:
    """STREAMINFO and where the audio starts; None if `head` is not a FLAC file (an ID3v2 tag may precede it)."""
    pos = 0
    if head[:3] == b"ID3" and len(head) >= 10:  # noqa: PLR2004  syncsafe size, then the stream
        pos = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
    if head[pos : pos + 4] != b"fLaC":
        return None
    pos += 4
    streaminfo: bytes | None = None  # its 34 bytes
    while pos + 4 <= len(head):
        last, kind, length = head[pos] >> 7, head[pos] & 0x7F, int.from_bytes(head[pos + 1 : pos + 4], "big")
        if kind == 0:
            streaminfo = head[pos + 4 : pos + 4 + 34]
        pos += 4 + length
        if last:
            break
    else:
        raise HeaderError("FLAC metadata runs past the first 64 KiB")
    if streaminfo is None or len(streaminfo) < 34:  # noqa: PLR2004
        raise HeaderError("FLAC without STREAMINFO")
    _, max_block, _, max_frame = struct.unpack_from(">HH3s3s", streaminfo)
    packed = int.from_bytes(streaminfo[10:18], "big")  # rate 20, channels-1 3, bits-1 5, total samples 36
    return FlacInfo(
        sample_rate=packed >> 44,
        channels=((packed >> 41) & 7) + 1,
        bits=((packed >> 36) & 31) + 1,
        total_samples=packed & ((1 << 36) - 1),
        max_block=max_block,
        max_frame=int.from_bytes(max_frame, "big"),
        md5=streaminfo[18:34],
        audio_offset=pos,
    )


def decoded_md5(samples: "np.ndarray", bits: int) -> bytes:
    """FLAC's MD5 of decoded samples (channels, samples) in [-1, 1) as FFmpeg gives them (exact for bits <= 24)."""
    import hashlib

    import numpy as np

    ints = np.rint(samples.T.astype(np.float64) * 2.0 ** (bits - 1)).astype("<i4")  # (samples, channels)
    width = (bits + 7) // 8
    return hashlib.md5(ints.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()).digest()  # noqa: S324  FLAC's


def _utf8_number(data: bytes, pos: int) -> tuple[int, int] | None:
    """FLAC's UTF-8-like coded frame or sample number at `pos`: (value, position after it)."""
    first = data[pos]
    extra = next((n for n in range(7) if not (first << n) & 0x80), 7) - 1
    if extra < 0:
        return first, pos + 1
    if extra == 0 or extra > 6 or pos + 1 + extra > len(data):  # noqa: PLR2004
        return None
    value = first & (0x3F >> extra)
    for b in data[pos + 1 : pos + 1 + extra]:
        if b >> 6 != 0b10:  # noqa: PLR2004
            return None
        value = (value << 6) | (b & 0x3F)
    return value, pos + 1 + extra


def _frame_span(tail: bytes, pos: int, fixed_block: int) -> tuple[int, int] | None:
    """(first sample, samples) of a frame header at `pos` whose CRC-8 is right; None if it is not one."""
    if len(tail) < pos + 6:
        return None
    variable, size_code, rate_code = tail[pos + 1] & 1, tail[pos + 2] >> 4, tail[pos + 2] & 0xF
    if size_code == 0 or rate_code == 0xF or tail[pos + 3] & 1:  # noqa: PLR2004
        return None
    coded = _utf8_number(tail, pos + 4)
    if coded is None:
        return None
    number, p = coded
    if size_code == 6:  # noqa: PLR2004
        block, p = (tail[p] + 1, p + 1) if p < len(tail) else (0, p)
    elif size_code == 7:  # noqa: PLR2004
        block, p = int.from_bytes(tail[p : p + 2], "big") + 1, p + 2
    else:
        block = 192 if size_code == 1 else 576 << (size_code - 2) if size_code <= 5 else 256 << (size_code - 8)  # noqa: PLR2004
    p += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if p >= len(tail) or crc8(tail[pos:p]) != tail[p]:
        return None
    return (number if variable else number * fixed_block), block


def check_flac_end(info: FlacInfo, source: ByteSource) -> None:
    """HeaderError unless the last frame of the file is whole (CRC-16) and ends at STREAMINFO's total samples."""
    size = source.size()
    tail_bytes = max(1 << 14, 2 * (info.max_frame or info.max_block * info.channels * info.bits // 8 + 64))
    start = max(info.audio_offset, size - tail_bytes)
    tail = source.read_bytes(start, size - start)
    if len(tail) >= 128 and tail[-128:-125] == b"TAG":  # noqa: PLR2004  an ID3v1 tag after the audio
        tail = tail[:-128]
    for pos in range(len(tail) - 2, -1, -1):
        if tail[pos] != 0xFF or tail[pos + 1] >> 1 != 0x7C:  # noqa: PLR2004  sync code 0b11111111111110
            continue
        span = _frame_span(tail, pos, info.max_block)
        if span is None or crc16(tail[pos:-2]) != int.from_bytes(tail[-2:], "big"):
            continue
        end = span[0] + span[1]
        if info.total_samples and end != info.total_samples:
            raise HeaderError(f"STREAMINFO says {info.total_samples} samples, the last frame ends at sample {end}")
        return
    raise HeaderError(f"its last frame is cut short (no whole frame ends the file): truncated or damaged, {size} bytes")
