"""Decoding: every sub-format gives FFmpeg's own samples (the ffmpeg CLI's f32le decode), in folders and tar archives;
truncated files are named by probing."""

import shutil
import struct
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from conftest import tone, write_wav

from hubert_pipeline.audio import AudioSource, BadAudioError, file_id, load_audio, load_samples, probe
from hubert_pipeline.audio_headers import HEAD_BYTES, parse_flac, parse_wav
from hubert_pipeline.manifest import discover

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")

# name -> ffmpeg output options; every file is 1.3 s of 16 kHz mono made from the same float source
FORMATS = {
    "s16.wav": ["-c:a", "pcm_s16le"],
    "s24.wav": ["-c:a", "pcm_s24le"],  # FFmpeg writes WAVE_FORMAT_EXTENSIBLE above 16 bits
    "s32.wav": ["-c:a", "pcm_s32le"],
    "f32.wav": ["-c:a", "pcm_f32le"],
    "f64.wav": ["-c:a", "pcm_f64le"],
    "u8.wav": ["-c:a", "pcm_u8"],
    "mulaw.wav": ["-c:a", "pcm_mulaw"],
    "alaw.wav": ["-c:a", "pcm_alaw"],
    "flac.flac": ["-c:a", "flac"],
    "mp3.mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
    "vorbis.ogg": ["-c:a", "libvorbis"],
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def ffmpeg_samples(path, fmt="f32le") -> torch.Tensor:
    """The samples as the ffmpeg CLI decodes them: the reference."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f", fmt, "-"],
                         capture_output=True, check=True).stdout  # fmt: skip
    return torch.from_numpy(np.frombuffer(out, "<f4" if fmt == "f32le" else "<f8").copy())


def wav_bytes(samples: np.ndarray, *, tag: int, bits: int, extensible: bool = False, rate: int = 16_000) -> bytes:
    """A mono WAV written by hand: plain or WAVE_FORMAT_EXTENSIBLE around format `tag`."""
    data = samples.tobytes()
    block = bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, 1, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (tag + the KSDATAFORMAT suffix)
        fmt += struct.pack("<HHI", 22, bits, 4) + struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    source = tone(1.3, seed=1).astype("<f4") * 2.5  # some samples near full scale
    (root / "source.raw").write_bytes(np.clip(source, -1, 1).tobytes())
    for name, options in FORMATS.items():
        ffmpeg("-f", "f32le", "-ar", "16000", "-ac", "1", "-i", str(root / "source.raw"), *options, str(root / name))
    pcm16 = (np.clip(source, -1, 1) * 32767).astype("<i2")
    (root / "float-plain.wav").write_bytes(wav_bytes(np.clip(source, -1, 1), tag=3, bits=32))
    (root / "float-ext.wav").write_bytes(wav_bytes(np.clip(source, -1, 1), tag=3, bits=32, extensible=True))
    (root / "s16-ext.wav").write_bytes(wav_bytes(pcm16, tag=1, bits=16, extensible=True))
    (root / "source.raw").unlink()
    return root


ALL = [*FORMATS, "float-plain.wav", "float-ext.wav", "s16-ext.wav"]


@pytest.mark.parametrize("name", ALL)
def test_every_sub_format_decodes_to_ffmpegs_own_samples(formats, name):
    path = formats / name
    waveform = load_audio(AudioSource(str(path)))
    torch.testing.assert_close(waveform, ffmpeg_samples(path))
    torch.testing.assert_close(waveform.double(), ffmpeg_samples(path, "f64le"), rtol=0, atol=2**-24)
    assert probe(AudioSource(str(path))) == waveform.numel()
    assert probe(AudioSource(str(path)), "full") == waveform.numel()


def wav_header(data: bytes):
    header = parse_wav(data[:HEAD_BYTES], len(data))
    assert header is not None
    return header


def test_wav_sub_formats_are_what_their_names_say(formats):
    tags = {name: wav_header((formats / name).read_bytes()) for name in ALL if name.endswith(".wav")}
    assert tags["float-ext.wav"].format_tag == 3  # the sub-format inside WAVE_FORMAT_EXTENSIBLE
    assert (formats / "float-ext.wav").read_bytes()[20:22] == b"\xfe\xff"
    assert tags["mulaw.wav"].format_tag == 7
    assert tags["alaw.wav"].format_tag == 6
    assert (tags["f64.wav"].bits, tags["s24.wav"].bits, tags["u8.wav"].bits) == (64, 24, 8)


def test_float_wav_is_read_right_where_torchcodecs_wav_decoder_is_wrong(formats):
    from torchcodec.decoders import WavDecoder

    reference = ffmpeg_samples(formats / "float-ext.wav")
    torch.testing.assert_close(load_audio(AudioSource(str(formats / "float-ext.wav"))), reference)
    wrong = WavDecoder(str(formats / "float-ext.wav")).get_all_samples().data[0]
    assert (wrong - reference).abs().max() > 0.1  # the bug this module works around; if fixed, nothing breaks


@pytest.mark.parametrize("name", ["s16.wav", "s16-ext.wav"])
def test_int16_wav_is_read_without_decoding_and_exactly_equals_ffmpeg(formats, name):
    samples = load_samples(AudioSource(str(formats / name)))
    assert samples.dtype == np.int16  # the fast path: no decoder
    assert torch.equal(load_audio(AudioSource(str(formats / name))), ffmpeg_samples(formats / name))


def test_every_sub_format_in_a_tar_archive_gives_the_files_samples(formats, tmp_path):
    archive = tmp_path / "corpus.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ALL:
            tar.add(formats / name, arcname=f"corpus/{name}")
    members = dict(discover(archive, [".wav", ".flac", ".mp3", ".ogg"]))
    assert set(members) == {file_id(name) for name in ALL}
    for name in ALL:
        source = members[file_id(name)]
        assert source.archive == str(archive.resolve())
        torch.testing.assert_close(load_audio(source), ffmpeg_samples(formats / name))
        assert probe(source) == load_audio(source).numel()


def test_opus_and_other_rates_and_stereo_are_refused_naming_rate_and_channels(formats, tmp_path):
    ffmpeg("-i", str(formats / "s16.wav"), "-c:a", "libopus", str(tmp_path / "speech.opus"))
    with pytest.raises(BadAudioError, match=r"speech\.opus.*48000 Hz"):
        probe(AudioSource(str(tmp_path / "speech.opus")))
    ffmpeg("-i", str(formats / "s16.wav"), "-ac", "2", str(tmp_path / "stereo.flac"))
    with pytest.raises(BadAudioError, match=r"stereo\.flac.*2 channel\(s\)"):
        probe(AudioSource(str(tmp_path / "stereo.flac")))
    ffmpeg("-i", str(formats / "s16.wav"), "-ar", "8000", "-c:a", "pcm_mulaw", str(tmp_path / "phone.wav"))
    with pytest.raises(BadAudioError, match=r"phone\.wav.*8000 Hz"):
        load_audio(AudioSource(str(tmp_path / "phone.wav")))


def cut(path, tmp_path, keep: float):
    data = path.read_bytes()
    out = tmp_path / f"cut-{path.name}"
    out.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return AudioSource(str(out))


@pytest.mark.parametrize("name", ["s16.wav", "s24.wav", "f32.wav", "mulaw.wav", "float-ext.wav"])
def test_truncated_wav_is_named_with_header_and_file_sizes(formats, tmp_path, name):
    source = cut(formats / name, tmp_path, 0.7)
    with pytest.raises(BadAudioError, match=rf"cut-{name}: WAV truncated: its header says \d+ bytes of audio"):
        probe(source)
    with pytest.raises(BadAudioError, match="truncated"):
        load_audio(source)


def test_wav_cut_inside_a_frame_is_named(formats, tmp_path):
    data = bytearray((formats / "s24.wav").read_bytes())
    header = wav_header(bytes(data))
    data[header.data_offset - 4 : header.data_offset] = struct.pack("<I", header.data_size - 1)
    (tmp_path / "odd.wav").write_bytes(bytes(data[: header.data_offset + header.data_size - 1]))
    with pytest.raises(BadAudioError, match=r"odd\.wav: WAV .* not a whole number of 3-byte frames"):
        probe(AudioSource(str(tmp_path / "odd.wav")))


@pytest.mark.parametrize("keep", [0.95, 0.6, 0.2, -1, -2])
def test_truncated_flac_is_named_without_decoding(formats, tmp_path, keep):
    source = cut(formats / "flac.flac", tmp_path, keep)
    with pytest.raises(BadAudioError, match=r"cut-flac\.flac: FLAC its last frame is cut short"):
        probe(source)


def test_flac_cut_at_a_frame_boundary_is_named_by_streaminfos_total(formats, tmp_path):
    data = bytearray((formats / "flac.flac").read_bytes())
    info = parse_flac(bytes(data[:HEAD_BYTES]))
    assert info is not None
    position = 4 + 4 + 10  # "fLaC", block header, then the 10 bytes before rate/channels/bits/total
    packed = int.from_bytes(data[position : position + 8], "big") + 5000  # total samples + 5000
    data[position : position + 8] = packed.to_bytes(8, "big")
    (tmp_path / "short.flac").write_bytes(bytes(data))
    total = info.total_samples
    message = rf"short\.flac: FLAC STREAMINFO says {total + 5000} samples, the last frame ends at sample {total}"
    with pytest.raises(BadAudioError, match=message):
        probe(AudioSource(str(tmp_path / "short.flac")))


def test_truncated_mp3_and_ogg_are_named(tmp_path):
    for name in ("long.mp3", "long.ogg"):
        ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=16000:duration=6", str(tmp_path / name))
        assert probe(AudioSource(str(tmp_path / name))) == 96_000
        with pytest.raises(BadAudioError, match=rf"cut-{name}"):
            probe(cut(tmp_path / name, tmp_path, 0.5))


def test_empty_corrupt_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(BadAudioError, match=r"empty\.wav: empty"):
        probe(AudioSource(str(write_wav(tmp_path / "empty.wav", np.zeros(0)))))
    (tmp_path / "junk.mp3").write_bytes(b"not audio at all" * 10)
    with pytest.raises(BadAudioError, match=r"junk\.mp3: cannot be decoded"):
        probe(AudioSource(str(tmp_path / "junk.mp3")))
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    with pytest.raises(BadAudioError, match=r"junk\.wav"):
        probe(AudioSource(str(tmp_path / "junk.wav")))
    with pytest.raises(BadAudioError, match=r"gone\.flac: cannot be read"):
        probe(AudioSource(str(tmp_path / "gone.flac")))


# More containers and codecs FFmpeg reads: each is read as FFmpeg reads it (or named by probing)
MORE = {
    "rf64.wav": ["-c:a", "pcm_s16le", "-rf64", "always"],  # 64-bit sizes (ds64 chunk)
    "tagged.wav": ["-c:a", "pcm_s16le", "-metadata", "title=x" * 50],  # a LIST chunk before the data
    "adpcm_ima.wav": ["-c:a", "adpcm_ima_wav"],  # torchcodec drops 3 of 4 blocks: named, never read wrong
    "adpcm_ms.wav": ["-c:a", "adpcm_ms"],
    "gsm.wav": ["-c:a", "libgsm_ms", "-ar", "8000"],  # 8 kHz: refused, named
    "big.aiff": ["-c:a", "pcm_s16be"],
    "sun.au": ["-c:a", "pcm_s16be"],
    "sony.w64": ["-c:a", "pcm_f32le"],
    "apple.caf": ["-c:a", "pcm_s24le"],
    "pack.wv": ["-c:a", "wavpack"],
    "flac.ogg": ["-c:a", "flac"],  # Ogg FLAC: no fLaC header, decoded
    "opus.webm": ["-c:a", "libopus", "-ar", "48000"],  # 48 kHz: refused, named
}


@pytest.mark.parametrize("name", list(MORE))
def test_other_containers_and_codecs_are_read_as_ffmpeg_reads_them_or_named(formats, tmp_path, name):
    path = tmp_path / name
    ffmpeg("-i", str(formats / "s16.wav"), *MORE[name], str(path))
    source = AudioSource(str(path))
    reference = ffmpeg_samples(path)
    if name in ("gsm.wav", "opus.webm"):
        with pytest.raises(BadAudioError, match=rf"{name}: expected mono 16000 Hz, got 1 channel\(s\) at (8|48)000 Hz"):
            probe(source)
        return
    if name.startswith("adpcm"):
        with pytest.raises(BadAudioError, match=rf"{name}: its header says about 1.40 s, only 0.\d\d s decode"):
            probe(source)
        return
    torch.testing.assert_close(load_audio(source), reference)
    assert probe(source) == probe(source, "full") == reference.numel()


@pytest.mark.parametrize("bits", [16, 24])
def test_flac_damaged_inside_is_named_by_full_verification_through_streaminfos_md5(formats, tmp_path, bits):
    path = tmp_path / f"b{bits}.flac"
    depth = ["-sample_fmt", "s32", "-bits_per_raw_sample", "24"] if bits == 24 else ["-sample_fmt", "s16"]
    ffmpeg("-i", str(formats / "f32.wav"), "-c:a", "flac", *depth, str(path))
    info = parse_flac(path.read_bytes()[:HEAD_BYTES])
    assert info is not None
    assert info.bits == bits
    assert probe(AudioSource(str(path)), "full") == info.total_samples  # the MD5 of an intact file matches
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 40] = bytes(b ^ 0x5A for b in data[middle : middle + 40])
    (tmp_path / "damaged.flac").write_bytes(bytes(data))
    damaged = AudioSource(str(tmp_path / "damaged.flac"))
    assert probe(damaged) == info.total_samples  # FFmpeg conceals the damage: same length, other samples
    with pytest.raises(BadAudioError, match=r"damaged\.flac: FLAC decoded samples do not match STREAMINFO's MD5"):
        probe(damaged, "full")
