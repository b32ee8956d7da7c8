"""The text the demo corpus reads: a UTF-8 text (by default the licence texts of Debian's common-licenses) cut into
sentences of MIN_WORDS..MAX_WORDS words, grouped into utterances of a seeded random length, and dealt into one region
of consecutive utterances per split, so that no sentence is read in two splits (`hubert_pipeline.demo`)."""

import logging
import math
import random
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "abx")
LICENSES = Path("/usr/share/common-licenses")
MIN_WORDS, MAX_WORDS = 3, 30  # shorter sentences are dropped, longer ones cut (30 words ~ 12.5 s at speed 1)
SECONDS_PER_WORD = 0.42  # Festival's pace at speed 1, pauses included; only used to plan, refined as audio comes in
UTTERANCE_SECONDS = (2.0, 13.0)  # target length of an utterance at speed 1


def read_text(path: str) -> str:
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"demo text file {path} does not exist")
        return Path(path).read_text(encoding="utf-8")
    if not LICENSES.is_dir():
        raise FileNotFoundError(f"{LICENSES} does not exist: set demo.text to a UTF-8 text file")
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())  # GPL -> GPL-3 etc.
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def _clean(paragraph: str) -> str:
    text = unicodedata.normalize("NFKD", paragraph).encode("ascii", "ignore").decode()
    text = re.sub(r"<[^>]*>|https?://\S+|www\.\S+|\S+@\S+", " ", text)  # URLs, addresses: spelled letter by letter
    text = re.sub(r"[^A-Za-z0-9.,;:!?'()\- ]", " ", text)
    return " ".join(text.split())


def _pieces(words: list[str]) -> Iterator[list[str]]:
    """Cut a long sentence into pieces of at most MAX_WORDS words, at clause ends (`,;:`) where possible."""
    clauses: list[list[str]] = [[]]
    for word in words:
        clauses[-1].append(word)
        if word[-1] in ",;:":
            clauses.append([])
    piece: list[str] = []
    for clause in filter(None, clauses):
        if piece and len(piece) + len(clause) > MAX_WORDS:
            yield piece
            piece = []
        count = math.ceil((len(piece) + len(clause)) / MAX_WORDS)  # > 1 only for a clause too long on its own
        for i in range(count - 1):
            yield clause[i * len(clause) // count : (i + 1) * len(clause) // count]
        piece += clause[(count - 1) * len(clause) // count :]
    if piece:
        yield piece


def sentences(text: str) -> list[str]:
    """Sentences (or pieces of long ones) of MIN_WORDS..MAX_WORDS words, in text order, each kept once."""
    paragraphs, current = [], []
    for line in [*text.splitlines(), ""]:
        visible = line.replace(" ", "").replace("\t", "")
        if visible and sum(c.isalpha() for c in visible) >= 0.6 * len(visible):
            current.append(line)
        elif not visible or current:  # a blank or mostly non-letter line ends the paragraph
            paragraphs.append(" ".join(current))
            current = []
    result, seen = [], set()
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.!?;:])\s+(?=[\"'(]?[A-Z0-9])", _clean(paragraph)):
            words = sentence.split()
            if len(words) < MIN_WORDS or sum(c.isalpha() for c in sentence) < 2 * len(words):
                continue
            for piece in _pieces(words):
                key = " ".join(piece).lower()
                if len(piece) >= MIN_WORDS and key not in seen:
                    seen.add(key)
                    result.append(" ".join(piece))
    return result


def utterances(sents: list[str], seed: int) -> list[str]:
    """Group consecutive sentences into utterances of a seeded random target length."""
    rng = random.Random(f"{seed}-utterances")  # noqa: S311 (reproducible, not cryptographic)
    result: list[str] = []
    i = 0
    while i < len(sents):
        budget = rng.uniform(*UTTERANCE_SECONDS) / SECONDS_PER_WORD
        group = [sents[i]]
        i += 1
        while i < len(sents) and sum(len(s.split()) for s in [*group, sents[i]]) <= budget:
            group.append(sents[i])
            i += 1
        result.append(" ".join(group))
    return result


def regions(utts: list[str], minutes: dict[str, float]) -> dict[str, list[str]]:
    """Cut the utterances into consecutive regions, one per split, proportional to its minutes."""
    active = [s for s in SPLITS if minutes[s] > 0]
    if len(utts) < len(active):
        logger.warning("the demo text gives only %d utterances: splits share their sentences", len(utts))
        return dict.fromkeys(active, utts)
    total, bounds, acc = sum(minutes[s] for s in active), [0], 0.0
    for k, split in enumerate(active):  # every region gets at least one utterance
        acc += minutes[split]
        end = max(round(len(utts) * acc / total), bounds[-1] + 1)
        bounds.append(min(end, len(utts) - (len(active) - k - 1)))
    return {split: utts[bounds[k] : bounds[k + 1]] for k, split in enumerate(active)}
