"""Benchmark: the cost of reading audio per format, in audio hours per CPU-core hour, beside the ffmpeg CLI's.

Training reads every file at every epoch, so this cost, times the epochs, is what data loading must sustain. For
each format, `--minutes` of audio (one tone with noise, cut into `--seconds`-long files, made with the ffmpeg CLI) are
read with `hubert_pipeline.audio.load_audio` (what every stage calls: the int16 WAV fast path, else FFmpeg through
torchcodec, resampling to 16 kHz where the format's rate differs) and probed with `probe` (the manifest stage's
work per file). The reference is the ffmpeg CLI decoding the same files to f32le at 16 kHz mono, one process per
file, timed in the same run (its process start-up included: it is the convert-once cost of a shell loop).
`convert` is the convert-once stage's work per file (`hubert_pipeline.transcode.convert_file`: read as above, write
`--convert-format`), `read converted` the cost of reading its output afterwards.

    uv run python bench/bench_decode.py                     # 5 minutes of audio per format, 10 s files
    uv run python bench/bench_decode.py --minutes 20 --formats flac mp3_48k
"""

import argparse
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from hubert_pipeline.audio import AudioSource, load_audio, probe
from hubert_pipeline.transcode import SUFFIX, Format, convert_file

# name -> (extension, rate, ffmpeg codec options)
FORMATS = {
    "wav_s16": (".wav", 16_000, ["-c:a", "pcm_s16le"]),
    "wav_f32": (".wav", 16_000, ["-c:a", "pcm_f32le"]),
    "wav_s24": (".wav", 16_000, ["-c:a", "pcm_s24le"]),
    "flac": (".flac", 16_000, ["-c:a", "flac"]),
    "mp3": (".mp3", 16_000, ["-c:a", "libmp3lame", "-b:a", "64k"]),
    "vorbis": (".ogg", 16_000, ["-c:a", "libvorbis"]),
    "opus_48k": (".opus", 48_000, ["-c:a", "libopus", "-b:a", "32k"]),
    "mp3_48k": (".mp3", 48_000, ["-c:a", "libmp3lame", "-b:a", "64k"]),  # Common Voice
    "flac_44k": (".flac", 44_100, ["-c:a", "flac"]),
    "wav_s16_8k": (".wav", 8_000, ["-c:a", "pcm_s16le"]),  # telephone
}


def make_files(folder: Path, name: str, minutes: float, seconds: float) -> list[Path]:
    extension, rate, options = FORMATS[name]
    paths = []
    for i in range(max(1, round(minutes * 60 / seconds))):
        path = folder / f"{name}-{i:05d}{extension}"
        tone = f"sine=frequency={200 + i % 50}:sample_rate={rate}:duration={seconds}"
        noise = f"anoisesrc=color=pink:amplitude=0.05:sample_rate={rate}:duration={seconds}:seed={i}"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", tone, "-f", "lavfi",
                        "-i", noise, "-filter_complex", "amix=inputs=2", *options, str(path)], check=True)  # fmt: skip
        paths.append(path)
    return paths


def timed(fn, paths: list[Path]) -> float:  # noqa: ANN001
    start = time.process_time()
    for path in paths:
        fn(path)
    return time.process_time() - start


def ffmpeg_cli(path: Path) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ar", "16000", "-ac", "1", "-f",
                    "f32le", "-"], capture_output=True, check=True)  # fmt: skip


def cli_cpu_seconds(paths: list[Path]) -> float:
    """CPU seconds of the ffmpeg CLI processes (children), not of this process."""
    before = os.times()
    for path in paths:
        ffmpeg_cli(path)
    after = os.times()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def convert_seconds(paths: list[Path], source: AudioSource, out: Path, fmt: Format) -> tuple[float, float]:
    """CPU seconds of converting every file once to `fmt` under `out`, then of reading the converted files."""
    out.mkdir()
    dests = [out / f"{p.stem}{SUFFIX[fmt]}" for p in paths]
    start = time.process_time()
    for path, dest in zip(paths, dests, strict=True):
        convert_file(replace(source, path=str(path)), dest, fmt)
    converting = time.process_time() - start
    return converting, timed(lambda p: load_audio(AudioSource(str(p))), dests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--minutes", type=float, default=5.0, help="audio per format")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--convert-format", default="flac", choices=list(SUFFIX), help="what `convert` writes")
    args = parser.parse_args()
    print(f"{'format':<12} {'read: audio h / CPU h':>22} {'probe: audio h / CPU h':>23} {'ffmpeg CLI':>11} "
          f"{'read vs CLI':>12} {'convert':>8} {'read converted':>15}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for name in args.formats:
            paths = make_files(Path(tmp), name, args.minutes, args.seconds)
            audio_hours = len(paths) * args.seconds / 3600
            resample = FORMATS[name][1] != 16_000
            source = AudioSource("", resample=resample)
            load_audio(replace(source, path=str(paths[0])))  # warm-up: library loading
            read = timed(lambda p, s=source: load_audio(replace(s, path=str(p))), paths)
            probed = timed(lambda p, s=source: probe(replace(s, path=str(p))), paths)
            cli = cli_cpu_seconds(paths)
            converting, reread = convert_seconds(paths, source, Path(tmp) / f"{name}-converted", args.convert_format)
            seconds = {"read": read, "probe": probed, "cli": cli, "convert": converting, "reread": reread}
            rate = {k: audio_hours / (v / 3600) for k, v in seconds.items()}
            print(f"{name:<12} {rate['read']:>22,.0f} {rate['probe']:>23,.0f} {rate['cli']:>11,.0f} "
                  f"{rate['read'] / rate['cli']:>11.1f}x {rate['convert']:>8,.0f} {rate['reread']:>15,.0f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
