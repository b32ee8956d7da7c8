"""A deterministic multi-speaker English demo corpus, synthesized with Festival and eSpeak NG, with phone alignments.

Each voice (Festival's `kal`, `ked`, `slt`; eSpeak NG's `espeak-m1` ... `espeak-f4`, `hubert_pipeline.espeak`) times
each speed factor is one speaker. The synthesizer gives the waveform and the end time of every segment (eSpeak's in
Festival's phone set); a speed factor is applied by treating the signal as if it were sampled at `rate * factor` Hz and
resampling it to 16 kHz, which changes tempo and pitch together and scales every phone time exactly by `1 / factor`.

    python -m hubert_pipeline.demo data/demo --train-minutes 40 --valid-minutes 4 --abx-minutes 4 --workers 2

writes `wav/{train,valid,abx}/<speaker>/<fileid>.wav`, `alignments/<split>.jsonl`, `abx.item` and `summary.json`.
The same parameters give byte-identical files, whatever the number of workers. What is read is
`hubert_pipeline.demo_text`'s (sentences, utterances, one region of the text per split); the recording conditions
(rooms, noise, level) are `hubert_pipeline.demo_rooms`'s.
"""

import argparse
import json
import logging
import math
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubert_pipeline import espeak
from hubert_pipeline.audio import SAMPLE_RATE
from hubert_pipeline.demo_rooms import file_rng, room_and_noise
from hubert_pipeline.demo_text import LICENSES, SECONDS_PER_WORD, SPLITS, read_text, regions, sentences, utterances
from hubert_pipeline.io import atomic_open, atomic_path, write_json
from hubert_pipeline.params import DemoParams

logger = logging.getLogger(__name__)

FESTIVAL_VOICES = {"kal": "kal_diphone", "ked": "ked_diphone", "slt": "cmu_us_slt_arctic_hts"}
VOICES = {**FESTIVAL_VOICES, **espeak.VOICES}  # demo voice -> the synthesizer's voice name
# relative synthesis time per second of audio: HTS is much slower than diphones, formant synthesis much faster
VOICE_COST = {"kal": 1.0, "ked": 1.0, "slt": 15.0} | dict.fromkeys(espeak.VOICES, 0.2)
ABX_HEADER = "#file onset offset #phone prev-phone next-phone speaker"
SILENCE = "pau"
ABX_MIN_SECONDS = 0.02  # shorter phones may get no 50 Hz frame, and fastabx fails on an item without one
BATCH_JOBS = 40  # utterances per Festival process (startup and voice loading take ~0.2 s)
MAX_ROUNDS = 50


@dataclass(frozen=True)
class Speaker:
    voice: str
    speed: float

    @property
    def name(self) -> str:
        return f"{self.voice}-s{round(self.speed * 100):03d}"


@dataclass(frozen=True)
class Job:
    split: str
    index: int
    text: str
    speaker: Speaker

    @property
    def fileid(self) -> str:
        return f"{self.speaker.name}_{self.split}_{self.index:05d}"

    @property
    def words(self) -> int:
        return len(self.text.split())


@dataclass(frozen=True)
class Synthesized:
    job: Job
    path: Path  # Festival's wav, at its own sample rate
    sample_rate: int
    num_samples: int
    ends: tuple[tuple[str, float], ...]  # (phone, end in seconds) for each item of the Segment relation

    @property
    def orig_freq(self) -> int:
        """The rate the signal is declared to have before resampling to 16 kHz: this applies the speed factor."""
        return round(self.sample_rate * self.job.speaker.speed)

    @property
    def num_output_samples(self) -> int:
        return -(-self.num_samples * SAMPLE_RATE // self.orig_freq)

    @property
    def duration(self) -> float:
        return self.num_output_samples / SAMPLE_RATE


def speakers_of(params: DemoParams) -> list[Speaker]:
    if unknown := [v for v in params.voices if v not in VOICES]:
        raise ValueError(f"unknown demo voice(s) {unknown}; known voices are {sorted(VOICES)}")
    speakers = [Speaker(voice, speed) for voice in params.voices for speed in params.speeds]
    names = [s.name for s in speakers]
    if not speakers:
        raise ValueError("the demo needs at least one voice and one speed")
    if len(set(names)) != len(names):
        raise ValueError(f"demo voices x speeds give duplicate speaker names {names}")
    return speakers


def jobs(split: str, region: list[str], speakers: list[Speaker], seed: int) -> Iterator[Job]:
    """Endless jobs for one split: the region again and again, each pass shifting every utterance to the next speaker.

    On the first pass speakers are dealt in seeded random permutations, so any len(speakers) consecutive jobs use each
    speaker once; within len(speakers) passes every utterance has been read by every speaker.
    """
    rng = random.Random(f"{seed}-{split}-speakers")  # noqa: S311 (reproducible, not cryptographic)
    first: list[int] = []
    while len(first) < len(region):
        first += rng.sample(range(len(speakers)), len(speakers))
    index = 0
    while True:
        for u, text in enumerate(region):
            speaker = speakers[(first[u] + index // len(region)) % len(speakers)]
            yield Job(split, index, text, speaker)
            index += 1


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_script(voice: str, batch: list[Job], folder: Path) -> str:
    lines = [
        f"(voice_{VOICES[voice]})",
        '(format t "VOICE-OK\\n")',
        "(define (demo_synth fileid text path)",
        "  (let ((utt (utt.synth (eval (list 'Utterance 'Text text)))))",
        "    (utt.save.wave utt path 'riff)",
        '    (format t "BEGIN %s\\n" fileid)',
        '    (mapcar (lambda (s) (format t "SEG %s %f\\n" (item.name s) (item.feat s "end")))',
        "            (utt.relation.items utt 'Segment))",
        '    (format t "END %s\\n" fileid)))',
    ]
    for job in batch:
        call = f"(demo_synth {_quote(job.fileid)} {_quote(job.text)} {_quote(str(folder / f'{job.fileid}.wav'))})"
        lines.append(f'(unwind-protect {call} (format t "FAIL %s\\n" {_quote(job.fileid)}))')
    return "\n".join(lines) + "\n"


def _command(voice: str, batch: list[Job], folder: Path) -> list[str]:
    """The synthesizer process for a batch of one voice: Festival on a script, or eSpeak NG's worker on a job list."""
    if voice in FESTIVAL_VOICES:
        script = folder / f"{batch[0].fileid}.scm"
        script.write_text(_festival_script(voice, batch, folder), encoding="ascii")
        return ["festival", "-b", str(script)]
    listing = folder / f"{batch[0].fileid}.tsv"
    listing.write_text("".join(f"{job.fileid}\t{job.text}\n" for job in batch), encoding="utf-8")
    return [sys.executable, "-m", "hubert_pipeline.espeak", VOICES[voice], str(listing), str(folder)]


def run_synthesizer(voice: str, batch: list[Job], folder: Path) -> list[Synthesized]:
    """Synthesize a batch of jobs of one voice in one process; jobs the synthesizer fails on are left out."""
    proc = subprocess.run(_command(voice, batch, folder), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.startswith("VOICE-OK"):
        raise RuntimeError(f"synthesis failed on voice {VOICES[voice]} (rc {proc.returncode}): {proc.stderr[-2000:]}")
    ends: dict[str, list[tuple[str, float]]] = {}
    done: set[str] = set()
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "BEGIN":
            current = ends.setdefault(rest, [])
        elif tag == "SEG":
            name, end = rest.split()
            current.append((name, float(end)))
        elif tag == "END":
            done.add(rest)
    results = []
    for job in batch:
        if job.fileid not in done or not ends[job.fileid]:
            logger.warning("%s failed on %s (%r); skipped", VOICES[voice], job.fileid, job.text)
            continue
        path = folder / f"{job.fileid}.wav"
        with wave.open(str(path), "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:  # noqa: PLR2004
                msg = f"{VOICES[voice]} wrote {path} with {w.getnchannels()} channels, {w.getsampwidth()} bytes"
                raise RuntimeError(msg)
            results.append(Synthesized(job, path, w.getframerate(), w.getnframes(), tuple(ends[job.fileid])))
    return results


def _phones(synth: Synthesized) -> list[list[Any]]:
    """Segments as [onset, offset, phone] after the speed scaling, covering exactly [0, duration]."""
    scale, duration = synth.sample_rate / synth.orig_freq, round(synth.duration, 4)
    if abs(synth.ends[-1][1] * scale - synth.duration) > 0.05:  # noqa: PLR2004
        logger.debug(
            "%s: segments end at %.3f s, audio at %.3f s", synth.job.fileid, synth.ends[-1][1] * scale, duration
        )
    phones: list[list[Any]] = []
    onset = 0.0
    for k, (name, end) in enumerate(synth.ends):
        offset = duration if k == len(synth.ends) - 1 else min(round(end * scale, 4), duration)
        if offset > onset:
            phones.append([onset, offset, name])
            onset = offset
    return phones


def write_wav(synth: Synthesized, path: Path, params: DemoParams) -> None:
    import numpy as np
    import torch
    from torchaudio.functional import resample

    with wave.open(str(synth.path), "rb") as w:
        samples = np.frombuffer(w.readframes(synth.num_samples), dtype="<i2")
    x = torch.from_numpy(samples.astype(np.float32) / 32768)
    if synth.orig_freq != SAMPLE_RATE:
        x = resample(x, synth.orig_freq, SAMPLE_RATE)
        # torchaudio sizes its output in float32, one sample short at some lengths: pad to the exact length (a zero)
        x = torch.nn.functional.pad(x, (0, synth.num_output_samples - x.numel()))
    assert x.numel() == synth.num_output_samples, (x.numel(), synth.num_output_samples)
    if params.room_rt60 or params.noise_snr_db:
        x = torch.from_numpy(room_and_noise(x.double().numpy(), file_rng(params.seed, synth.job.fileid), params))
    pcm = (x * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy().astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def _abx_items(records: list[dict[str, Any]]) -> list[str]:
    lines = [ABX_HEADER]
    for record in records:
        phones = record["phones"]
        for k in range(1, len(phones) - 1):
            onset, offset, phone = phones[k]
            if phone == SILENCE or offset - onset < ABX_MIN_SECONDS:
                continue
            prev, nxt = ("SIL" if p[2] == SILENCE else p[2] for p in (phones[k - 1], phones[k + 1]))
            lines.append(f"{record['fileid']} {onset:.4f} {offset:.4f} {phone} {prev} {nxt} {record['speaker']}")
    return lines


def _accepted(results: list[Synthesized], seconds: float, speakers: int) -> int | None:
    """Length of the shortest prefix of `results` that reaches `seconds` and has every speaker, if any."""
    total, seen = 0.0, set()
    for k, synth in enumerate(results):
        total += synth.duration
        seen.add(synth.job.speaker)
        if total >= seconds and len(seen) == speakers:
            return k + 1
    return None


def _plan(stream: Iterator[Job], have: list[Synthesized], seconds: float, speakers: int, rate: float) -> list[Job]:
    """Next jobs of a split: enough for its missing seconds (estimated from words) and for speakers not heard yet."""
    missing = seconds - sum(s.duration for s in have)
    seen = {s.job.speaker for s in have}
    todo: list[Job] = []
    while missing > 0 or len(seen) < speakers:
        todo.append(job := next(stream))
        missing -= 1.05 * rate * job.words / job.speaker.speed
        seen.add(job.speaker)
    return todo


def _batches(todo: list[Job], workers: int) -> list[list[Job]]:
    """One voice per Festival process, at least `workers` processes per voice; the most expensive first."""
    batches = []
    for voice in VOICES:
        jobs_of_voice = [j for j in todo if j.speaker.voice == voice]
        count = min(len(jobs_of_voice), max(workers, math.ceil(len(jobs_of_voice) / BATCH_JOBS)))
        batches += [
            jobs_of_voice[i * len(jobs_of_voice) // count : (i + 1) * len(jobs_of_voice) // count] for i in range(count)
        ]
    return sorted(batches, key=lambda b: -VOICE_COST[b[0].speaker.voice] * sum(j.words for j in b))


def _synthesize_splits(
    streams: dict[str, Iterator[Job]],
    seconds: dict[str, float],
    speakers: int,
    folder: Path,
    *,
    pool: ThreadPoolExecutor,
    workers: int,
) -> dict[str, list[Synthesized]]:
    """Synthesize rounds of jobs until each split has a prefix of its job stream long enough, with every speaker.

    What a split gets depends only on its job stream, never on how the jobs were batched: the output is the same for
    any number of workers.
    """
    from tqdm import tqdm

    results: dict[str, list[Synthesized]] = {split: [] for split in streams}
    finished: set[str] = set()
    rate = SECONDS_PER_WORD
    with tqdm(total=round(sum(seconds[split] for split in streams)), unit="s", desc="synthesizing demo") as bar:
        for _ in range(MAX_ROUNDS):
            if not (pending := [split for split in streams if split not in finished]):
                return results
            todo = [
                j for split in pending for j in _plan(streams[split], results[split], seconds[split], speakers, rate)
            ]
            batches = _batches(todo, workers)
            logger.debug("round of %d jobs in %d batches", len(todo), len(batches))
            done: dict[Job, Synthesized] = {}
            for future in [pool.submit(run_synthesizer, b[0].speaker.voice, b, folder) for b in batches]:
                for synth in future.result():
                    done[synth.job] = synth
                    bar.update(min(round(synth.duration), bar.total - bar.n))
            if not done:
                raise RuntimeError("the synthesizers synthesized none of the planned utterances")
            for split in pending:
                results[split] += [done[j] for j in todo if j.split == split and j in done]
                if (k := _accepted(results[split], seconds[split], speakers)) is not None:
                    finished.add(split)
                    results[split] = results[split][:k]
            synthesized = [s for split in results for s in results[split]]
            rate = sum(s.duration * s.job.speaker.speed for s in synthesized) / sum(s.job.words for s in synthesized)
    raise RuntimeError(f"demo splits {pending} not complete after {MAX_ROUNDS} rounds: a synthesizer fails on a voice?")


def synthesize_demo(out_dir: str | Path, params: DemoParams, *, workers: int = 1) -> dict:
    """Synthesize the demo corpus into `out_dir`; return the summary also written to `out_dir/summary.json`."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    speakers = speakers_of(params)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shutil.which("festival") is None and any(s.voice in FESTIVAL_VOICES for s in speakers):
        raise RuntimeError("festival is not on PATH (apt-get install festival festvox-kallpc16k ...)")
    if not espeak.available() and any(s.voice in espeak.VOICES for s in speakers):
        raise RuntimeError("eSpeak NG is not installed (apt-get install espeak-ng), needed by the demo's espeak voices")
    minutes = {"train": params.train_minutes, "valid": params.valid_minutes, "abx": params.abx_minutes}
    utts = utterances(sentences(read_text(params.text)), params.seed)
    if not utts:
        raise ValueError(f"no usable sentence in demo text {params.text or LICENSES}")
    streams = {split: jobs(split, region, speakers, params.seed) for split, region in regions(utts, minutes).items()}
    logger.info("demo: %d utterances of text, %d speakers, minutes %s", len(utts), len(speakers), minutes)

    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {split: 60 * m for split, m in minutes.items()}
    with (
        tempfile.TemporaryDirectory(dir=out_dir, prefix=".synth-") as tmp,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        results = _synthesize_splits(streams, seconds, len(speakers), Path(tmp), pool=pool, workers=workers)
        finished = [s for split in results for s in results[split]]
        paths = {s.job: out_dir / "wav" / s.job.split / s.job.speaker.name / f"{s.job.fileid}.wav" for s in finished}
        for _ in tqdm(
            pool.map(lambda s: write_wav(s, paths[s.job], params), finished), total=len(finished), desc="writing"
        ):
            pass

    summary: dict[str, Any] = {
        "seed": params.seed,
        "voices": list(params.voices),
        "speeds": list(params.speeds),
        "room_rt60": list(params.room_rt60),
        "noise_snr_db": list(params.noise_snr_db),
        "speakers": [s.name for s in speakers],
        "text": params.text or str(LICENSES),
        "sample_rate": SAMPLE_RATE,
        "splits": {},
    }
    records: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        done_split = sorted(results.get(split, []), key=lambda s: s.job.fileid)
        records[split] = [
            {"fileid": s.job.fileid, "speaker": s.job.speaker.name, "phones": _phones(s)} for s in done_split
        ]
        with atomic_open(out_dir / "alignments" / f"{split}.jsonl") as f:
            f.writelines(json.dumps(record) + "\n" for record in records[split])
        total = sum(s.num_output_samples for s in done_split) / SAMPLE_RATE
        summary["splits"][split] = {"files": len(done_split), "minutes": round(total / 60, 4)}
        _remove_stale(out_dir / "wav" / split, {paths[s.job] for s in done_split})
    with atomic_open(out_dir / "abx.item") as f:
        f.write("\n".join(_abx_items(records["abx"])) + "\n")
    write_json(out_dir / "summary.json", summary)
    logger.info("demo corpus in %s: %s", out_dir, summary["splits"])
    return summary


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    stale = [p for p in folder.rglob("*.wav") if p not in keep] if folder.is_dir() else []
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d stale wav files from %s", len(stale), folder)


def main() -> None:
    defaults = DemoParams()
    parser = argparse.ArgumentParser(
        prog="python -m hubert_pipeline.demo",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of utterance lengths and speakers")
    for split in SPLITS:
        default = getattr(defaults, f"{split}_minutes")
        parser.add_argument(f"--{split}-minutes", type=float, default=default, help=f"minutes of audio in {split}")
    parser.add_argument("--voices", nargs="+", default=list(defaults.voices), help=f"among {sorted(VOICES)}")
    parser.add_argument("--speeds", nargs="+", type=float, default=list(defaults.speeds), help="speed factors")
    parser.add_argument("--text", default=defaults.text, help=f"UTF-8 text file; empty: the files of {LICENSES}")
    parser.add_argument("--room-rt60", nargs="*", type=float, default=list(defaults.room_rt60), help="low high (s)")
    parser.add_argument("--noise-snr-db", nargs="*", type=float, default=list(defaults.noise_snr_db), help="low high")
    parser.add_argument("--workers", type=int, default=1, help="parallel Festival processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = DemoParams(
        seed=args.seed,
        train_minutes=args.train_minutes,
        valid_minutes=args.valid_minutes,
        abx_minutes=args.abx_minutes,
        voices=tuple(args.voices),
        speeds=tuple(args.speeds),
        text=args.text,
        room_rt60=tuple(args.room_rt60),
        noise_snr_db=tuple(args.noise_snr_db),
    )
    summary = synthesize_demo(args.out_dir, params, workers=args.workers)
    print(json.dumps(summary["splits"], indent=2))


if __name__ == "__main__":
    main()
