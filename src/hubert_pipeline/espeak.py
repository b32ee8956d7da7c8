"""eSpeak NG voices for the demo corpus: its US English formant voices, with phone alignments in Festival's phone set.

Festival's English voices in Debian are three (`kal`, `ked`, `slt`); eSpeak NG adds voices of another synthesis
method (formant synthesis, variants of different pitch, formants and voice quality), so that the demo's speakers
differ by more than speed. `hubert_pipeline.demo` runs this module as a worker process per batch of utterances:

    python -m hubert_pipeline.espeak en-us+m3 JOBS.tsv FOLDER

reads `fileid<TAB>text` lines, writes `FOLDER/<fileid>.wav` (16-bit mono, eSpeak's 22,050 Hz) and prints the same
`BEGIN` / `SEG phone end` / `END` protocol as the demo's Festival script: the end time of each phone, mapped onto
Festival's (radio) phone set by `PHONES`, from eSpeak's phoneme events (their sample positions); silence is
appended to `TRAILING_SILENCE`. eSpeak's output
depends on what it synthesized before in the same process, so each utterance is synthesized in a child forked from
the freshly initialised worker: the same text and voice give the same bytes in any batch. Its noise sources draw
from the C library's `rand()`, whose state any other call in the process moves (seen once in CI, under load: every
eSpeak file of a run different): the child reseeds it (`srand(1)`, the state of a process that never called it).
"""

import argparse
import ctypes
import ctypes.util
import os
import sys
import wave
from pathlib import Path

LIBRARY = "espeak-ng"
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
VOICES = {f"espeak-{v}": f"en-us+{v}" for v in VARIANTS}  # demo voice -> eSpeak NG voice name
SILENCE = "pau"
# eSpeak ends an utterance a few ms after its last phone: too close to the end for the last phone's ABX item to get its
# frames (fastabx refuses an item past the features); Festival's diphone voices end with 0.2 s of silence
TRAILING_SILENCE = 0.2
# eSpeak NG's US English phoneme mnemonics (every one it uses on the demo's default text) -> Festival's radio phones.
# Where eSpeak has a phone Festival splits or lacks (r-coloured vowels, syllabic consonants, the flap, the glottal
# stop), the nearest single Festival phone. An l or r after a vowel eSpeak sounds within the vowel (its event has
# no length): the vowel's segment holds both.
PHONES = {
    "_": SILENCE, "_:": SILENCE, "_!": SILENCE,
    "@": "ax", "@2": "ax", "@-": "ax", "a#": "ax", "3": "er", "3:": "er",
    "I": "ih", "I#": "ih", "I2": "ih", "i": "iy", "i:": "iy", "i@": "iy", "i@3": "iy",
    "E": "eh", "e@": "eh", "eI": "ey", "a": "ae", "aa": "ae", "V": "ah",
    "0": "aa", "A:": "aa", "A@": "aa", "O:": "ao", "O2": "ao", "O@": "ao", "o@": "ao",
    "U": "uh", "U@": "uh", "u:": "uw", "oU": "ow", "aI": "ay", "aI3": "ay", "aI@": "ay", "aU": "aw", "OI": "oy",
    "b": "b", "d": "d", "g": "g", "p": "p", "t": "t", "t#": "t", "t2": "t", "?": "t", "k": "k",
    "f": "f", "v": "v", "T": "th", "D": "dh", "s": "s", "z": "z", "S": "sh", "Z": "zh", "h": "hh",
    "tS": "ch", "dZ": "jh", "m": "m", "n": "n", "n-": "n", "N": "ng",
    "l": "l", "@L": "l", "r": "r", "r-": "r", "w": "w", "j": "y", ";": "y",
}  # fmt: skip
_OUTPUT_SYNCHRONOUS, _PHONEME_EVENTS = 2, 1  # espeak_AUDIO_OUTPUT, espeakINITIALIZE_PHONEME_EVENTS
_EVENT_END_OF_LIST, _EVENT_PHONEME = 0, 7


class _EventId(ctypes.Union):
    _fields_ = (("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8))


class _Event(ctypes.Structure):  # espeak_EVENT of speak_lib.h
    _fields_ = (
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    )


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def available() -> bool:
    """Whether eSpeak NG's library can be loaded (Debian: apt-get install espeak-ng)."""
    return ctypes.util.find_library(LIBRARY) is not None


class Synthesizer:
    """eSpeak NG in this process: `synthesize` one utterance into samples and (sample, mnemonic) phoneme starts."""

    def __init__(self) -> None:
        name = ctypes.util.find_library(LIBRARY)
        if name is None:
            raise RuntimeError("eSpeak NG's library is not installed (apt-get install espeak-ng)")
        self.lib = ctypes.CDLL(name)
        self.sample_rate = self.lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, None, _PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self.samples: list[int] = []
        self.events: list[tuple[int, str]] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: eSpeak calls it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: "ctypes._Pointer[ctypes.c_short]", count: int, events: "ctypes._Pointer[_Event]") -> int:
        if wav and count > 0:
            self.samples.extend(wav[:count])
        k = 0
        while events[k].type != _EVENT_END_OF_LIST:
            if events[k].type == _EVENT_PHONEME:
                self.events.append((events[k].sample, events[k].id.string.decode("ascii")))
            k += 1
        return 0

    def set_voice(self, voice: str) -> None:
        if (err := self.lib.espeak_SetVoiceByName(voice.encode("ascii"))) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r} (error {err})")

    def synthesize(self, text: str) -> tuple[list[int], list[tuple[int, str]]]:
        self.samples, self.events = [], []
        data = text.encode("utf-8")
        if (err := self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)) != 0:
            raise RuntimeError(f"espeak_Synth failed (error {err}) on {text!r}")
        return self.samples, self.events


def phone_ends(events: list[tuple[int, str]], num_samples: int, sample_rate: int) -> list[tuple[str, float]]:
    """(Festival phone, end in seconds) for every phone from 0 to the end; silence before the first is `pau`."""
    starts = [(0, SILENCE)] + [(sample, PHONES[m]) for sample, m in events if m in PHONES]
    if unknown := sorted({m for _, m in events if m not in PHONES}):
        raise ValueError(f"eSpeak NG phoneme(s) {unknown} have no Festival phone in hubert_pipeline.espeak.PHONES")
    ends: list[tuple[str, float]] = []
    for k, (start, phone) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else num_samples
        if end <= start:
            continue
        if ends and phone == SILENCE and ends[-1][0] == SILENCE:
            ends[-1] = (SILENCE, end / sample_rate)
        else:
            ends.append((phone, end / sample_rate))
    return ends


def with_trailing_silence(
    samples: list[int], ends: list[tuple[str, float]], sample_rate: int
) -> tuple[list[int], list[tuple[str, float]]]:
    """Zeros after the last phone up to `TRAILING_SILENCE` s of `pau`, as Festival's diphone voices end (0.2 s)."""
    last_phone = ends[-2][1] if ends[-1][0] == SILENCE and len(ends) > 1 else ends[-1][1]
    end = max(len(samples), round((last_phone + TRAILING_SILENCE) * sample_rate))
    head = ends[:-1] if ends[-1][0] == SILENCE else ends
    return samples + [0] * (end - len(samples)), [*head, (SILENCE, end / sample_rate)]


def _write_wav(path: Path, samples: list[int], sample_rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((ctypes.c_short * len(samples))(*samples))


def _one(synth: Synthesizer, voice: str, fileid: str, text: str, folder: Path) -> None:
    """In a forked child: synthesize, write the wav, print its segments, exit (0: done)."""
    ctypes.CDLL(None).srand(1)  # eSpeak's noise: rand() from the state of a fresh process, whoever called it before
    synth.set_voice(voice)
    samples, events = synth.synthesize(text)
    samples, ends = with_trailing_silence(
        samples, phone_ends(events, len(samples), synth.sample_rate), synth.sample_rate
    )
    _write_wav(folder / f"{fileid}.wav", samples, synth.sample_rate)
    lines = [f"BEGIN {fileid}"] + [f"SEG {phone} {end:.6f}" for phone, end in ends] + [f"END {fileid}"]
    sys.stdout.write("\n".join(lines) + "\n")


def run_jobs(voice: str, jobs: list[tuple[str, str]], folder: Path) -> None:
    """Synthesize `(fileid, text)` jobs with one voice, each in a child forked from the initialised worker."""
    synth = Synthesizer()
    synth.set_voice(voice)
    print("VOICE-OK", flush=True)
    for fileid, text in jobs:
        sys.stdout.flush()
        if (pid := os.fork()) == 0:
            status = 1
            try:
                _one(synth, voice, fileid, text, folder)
                status = 0
            except ValueError as err:  # a phoneme without a Festival phone: the whole demo must stop, naming it
                sys.stderr.write(f"{fileid}: {err}\n")
                status = 2
            except Exception as err:  # noqa: BLE001 (reported to the parent, which skips the file as Festival's)
                sys.stderr.write(f"{fileid}: {err}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 2:  # noqa: PLR2004
            sys.exit(2)
        if status != 0:
            print(f"FAIL {fileid}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hubert_pipeline.espeak", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("voice", help=f"an eSpeak NG voice, e.g. {VOICES['espeak-m3']}")
    parser.add_argument("jobs", type=Path, help="fileid<TAB>text lines (UTF-8)")
    parser.add_argument("folder", type=Path, help="where the wav files go")
    args = parser.parse_args()
    lines = args.jobs.read_text(encoding="utf-8").splitlines()
    run_jobs(args.voice, [tuple(line.split("\t", 1)) for line in lines if line], args.folder)  # type: ignore[misc]


if __name__ == "__main__":
    main()
