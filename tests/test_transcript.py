"""Inner-monologue transcripts: the streaming writer (`infer`'s, bounded memory) writes exactly what the
in-memory `transcript_from_tokens` gives, on token streams with padding, control and out-of-range ids."""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import openmoshi
from openmoshi.generation.transcript import TranscriptWriter, transcript_from_tokens

PAD_IDS = (3, 0)


@pytest.fixture(scope="module")
def tokenizer():
    return spm.SentencePieceProcessor(
        model_file=str(Path(openmoshi.__file__).parent / "lm" / "assets" / "tokenizer_tiny.model"))


def random_stream(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    kinds = rng.integers(0, 6, length)
    ids = rng.integers(0, vocab, length)
    special = np.array([PAD_IDS[0], PAD_IDS[1], -1, vocab, 1, 2])  # pads, no target, past the vocabulary, control
    return [int(special[rng.integers(6)]) if k == 0 else int(i) for k, i in zip(kinds, ids)]


@pytest.mark.parametrize("length", [0, 1, 7, 400])
def test_writer_equals_in_memory_transcript(tmp_path, tokenizer, length):
    for seed in range(5):
        tokens = random_stream(np.random.default_rng([seed, length]), length, tokenizer.get_piece_size())
        expected = transcript_from_tokens(tokens, tokenizer, 12.5, PAD_IDS)
        writer = TranscriptWriter(tmp_path / "t.json", tokenizer, 12.5, PAD_IDS)
        for token in tokens:
            writer.add(token)
        writer.close()
        assert json.loads((tmp_path / "t.json").read_text()) == expected.to_json()
        assert writer.words == len(expected.words) and writer.text == expected.text


def test_writer_memory_does_not_hold_words(tmp_path, tokenizer):
    # an hour of a babbling model (a word every other frame) through the writer: only 4 bytes per frame stay in
    # memory (the in-memory transcript of the same stream peaks at ~45 MB)
    tokens = np.random.default_rng(0).integers(4, tokenizer.get_piece_size(), 45_000).tolist()
    tracemalloc.start()
    try:
        writer = TranscriptWriter(tmp_path / "t.json", tokenizer, 12.5, PAD_IDS)
        for token in tokens:
            writer.add(token)
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert writer.words > 10_000
    assert peak < 8e6, peak
