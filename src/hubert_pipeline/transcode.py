"""Convert a corpus once to 16 kHz mono files, for corpora whose decoding would starve the GPUs (48 kHz MP3, Opus).

Every file is read by the pipeline's one decoding path (`audio.load_samples`, with resampling and downmix: the
samples of `ffmpeg -ar 16000 -ac 1`, which every stage would otherwise read) and written next to its sub-folder
under the output folder, its file id kept (`<sub-folder>/<id>.flac`), atomically. Formats (`convert.format`):
`flac`, 24-bit FLAC (the decoded samples to 2^-24; FLAC holds no floats); `wav`, 32-bit float WAV (the samples
exactly); `wav16`, 16-bit PCM WAV (rounded to 16 bits, read back without decoding).

Resumable: a converted file carries its source's modification time, and a rerun skips the files whose output has
it; files of the output folder that no source gives any more (another format, a removed file) are deleted. The
folder's `conversion.json` records the digests of the conversion code (`sources.code_digests`): a rerun by other
code (DVC reruns the stage when its code changed) converts every file again rather than keeping the old ones.

    python -m hubert_pipeline.transcode /corpora/cv/train outputs/converted/train --extension .mp3
"""

import argparse
import json
import logging
import os
import struct
import wave
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from hubert_pipeline.audio import SAMPLE_RATE, AudioSource, as_float32, load_samples

if TYPE_CHECKING:
    import numpy as np

    from hubert_pipeline.params import ExecutionParams

logger = logging.getLogger(__name__)

Format = Literal["flac", "wav", "wav16"]
SUFFIX: dict[Format, str] = {"flac": ".flac", "wav": ".wav", "wav16": ".wav"}
FILES_PER_TASK = 64
CODE_STAMP = "conversion.json"  # {module: digest} of the code that converted the folder's files
INT16_SCALE = 32768.0
WAVE_FORMAT_IEEE_FLOAT = 3


@dataclass(frozen=True)
class Report:
    converted: int  # files written by this run
    skipped: int  # files already converted by an earlier run
    seconds: float  # of audio written by this run (16 kHz)


def output_path(fileid: str, source: AudioSource, root: str | Path, out: Path, fmt: Format) -> Path:
    """`out/<the source's sub-folder under root>/<file id><suffix>`; a tar member keeps its folder in the archive."""
    if source.archive is None:
        folder = Path(source.path).parent.relative_to(Path(root).resolve())
    else:
        folder = Path(*PurePosixPath(source.path).parent.parts)
        if folder.is_absolute() or ".." in folder.parts:
            raise ValueError(f"{source}: a member outside the archive's folder cannot be converted")
    return out / folder / f"{fileid}{SUFFIX[fmt]}"


def source_mtime_ns(source: AudioSource) -> int:
    return Path(source.archive or source.path).stat().st_mtime_ns


def write_float_wav(path: Path, samples: "np.ndarray") -> None:
    """32-bit IEEE float mono WAV at 16 kHz: `fmt ` (18 bytes, format 3), `fact`, `data`."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHHH", WAVE_FORMAT_IEEE_FLOAT, 1, SAMPLE_RATE, SAMPLE_RATE * 4, 4, 32, 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"fact" + struct.pack("<II", 4, len(samples)) + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def write_audio(path: Path, samples: "np.ndarray", fmt: Format) -> None:
    """Mono 16 kHz `samples` (int16 PCM or float32) to `path` in `fmt`; not atomic (the caller renames)."""
    import numpy as np

    if fmt == "wav16":
        pcm = samples if samples.dtype == np.int16 else np.clip(np.rint(samples * INT16_SCALE), -32768, 32767)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(pcm.astype("<i2").tobytes())
    elif fmt == "wav":
        write_float_wav(path, as_float32(samples))
    else:
        import torch
        from torchcodec.encoders import AudioEncoder

        encoder = AudioEncoder(torch.from_numpy(as_float32(samples))[None], sample_rate=SAMPLE_RATE)
        path.write_bytes(encoder.to_tensor("flac").numpy().tobytes())  # FFmpeg's FLAC encoder: 24-bit from floats


def convert_file(source: AudioSource, dest: Path, fmt: Format) -> int | None:
    """Samples written to `dest`, or None when it holds this source's conversion already (its modification time)."""
    mtime = source_mtime_ns(source)
    if dest.is_file() and dest.stat().st_mtime_ns == mtime:
        return None
    samples = load_samples(replace(source, resample=True, downmix=True))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write_audio(tmp, samples, fmt)
        os.utime(tmp, ns=(mtime, mtime))  # before the rename: a file named `dest` is complete and stamped
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return len(samples)


def convert_files(pairs: list[tuple[dict, str]], fmt: Format) -> Report:
    """One task: (source fields, destination) pairs, converted in order."""
    converted = skipped = samples = 0
    for fields, dest in pairs:
        n = convert_file(AudioSource(**fields), Path(dest), fmt)
        if n is None:
            skipped += 1
        else:
            converted, samples = converted + 1, samples + n
    return Report(converted, skipped, samples / SAMPLE_RATE)


def prune(out: Path, keep: set[Path]) -> int:
    """Delete the files under `out` that are not in `keep` (another format, a removed source, a killed write)."""
    removed = 0
    for path in out.rglob("*") if out.is_dir() else ():
        if path.is_file() and path not in keep:
            path.unlink()
            removed += 1
    return removed


def stamp_code(out: Path) -> Path:
    """`out/conversion.json`, naming this conversion code; the files of other code (or of a folder converted before
    the stamp) are removed first, to be converted again: every file under `out` is the stamped code's."""
    from hubert_pipeline.io import write_json
    from hubert_pipeline.sources import code_digests, describe_changes

    code, stamp = code_digests("transcode"), out / CODE_STAMP
    saved = json.loads(stamp.read_text()) if stamp.is_file() else None
    if saved != code:
        if prune(out, set()):
            logger.warning("%s: its files, converted by other code (%s), are converted again", out,
                           describe_changes(saved, code))  # fmt: skip
        write_json(stamp, code)
    return stamp


def convert_corpus(
    root: str | Path, out: str | Path, *, extensions: tuple[str, ...], fmt: Format, execution: "ExecutionParams"
) -> Report:
    """Convert every file of `root` (folder or uncompressed tar) under `out`, in tasks of local workers or SLURM."""
    from hubert_pipeline.launch import map_tasks
    from hubert_pipeline.manifest import check_unique_ids, discover_all

    out = Path(out)
    items = discover_all(root, extensions)
    check_unique_ids(items, root)
    pairs = [(asdict(src), str(output_path(fid, src, root, out, fmt))) for fid, src in items]
    prune(out, {Path(dest) for _, dest in pairs} | {stamp_code(out)})
    tasks = [{"pairs": pairs[i : i + FILES_PER_TASK], "fmt": fmt} for i in range(0, len(pairs), FILES_PER_TASK)]
    reports = map_tasks(convert_files, tasks, execution=execution, desc=f"convert {root}", threads=True)
    return Report(sum(r.converted for r in reports), sum(r.skipped for r in reports), sum(r.seconds for r in reports))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("root", help="the corpus: folder or uncompressed tar")
    parser.add_argument("out", help="the folder of the converted files")
    parser.add_argument("--extension", nargs="+", default=[".mp3"], help="the files converted (default: .mp3)")
    parser.add_argument("--format", choices=list(SUFFIX), default="flac", help="(default: flac)")
    parser.add_argument("--workers", type=int, default=1, help="local threads (default: 1)")
    args = parser.parse_args()

    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.params import ExecutionParams

    setup_logging()
    report = convert_corpus(args.root, args.out, extensions=tuple(args.extension), fmt=args.format,
                            execution=ExecutionParams(workers=args.workers))  # fmt: skip
    print(f"{report.converted} files converted ({report.seconds / 3600:.2f} h), {report.skipped} already converted")


if __name__ == "__main__":
    main()
