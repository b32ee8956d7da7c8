"""The demo's text: sentences of the right length, utterances, one region of the text per split."""

from hubert_pipeline.demo_text import read_text, regions, sentences, utterances


def test_sentences_drop_rule_lines_and_cut_long_sentences():
    long = " ".join(f"w{'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10]}," for i in range(70))  # one sentence, 70 words
    text = f"Title Of The Text\n\n-----=====-----\nA first sentence is here. Then a second one follows.\n\n{long}\n"
    result = sentences(text)
    assert result[:3] == ["Title Of The Text", "A first sentence is here.", "Then a second one follows."]
    assert all(3 <= len(s.split()) <= 30 for s in result)
    assert " ".join(result[3:]) == long


def test_splits_read_different_regions_of_the_default_text():
    utts = utterances(sentences(read_text("")), seed=0)
    parts = regions(utts, {"train": 40, "valid": 4, "abx": 4})
    assert sum(len(p) for p in parts.values()) == len(utts)
    assert not set(parts["train"]) & set(parts["valid"])
    assert not set(parts["valid"]) & set(parts["abx"])
