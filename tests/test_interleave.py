"""Golden tests of the Inner Monologue stream builder: hand-placed tokens on hand-written alignments.

Frames are 80 ms (12.5 Hz). PAD = 3, EPAD = 0, no token = -1; word pieces are 10, 11, ... so a stream reads
at a glance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece

from openmoshi.data.interleave import (
    AlignedWord,
    AlignmentError,
    InterleaveConfig,
    TokenizedWord,
    build_stream,
    parse_alignments,
    text_stream,
    window,
)

P, E, N = 3, 0, -1
TOKENIZER = Path(__file__).resolve().parents[1] / "openmoshi" / "lm" / "assets" / "tokenizer_tiny.model"


def w(tokens, start, end, speaker="SPEAKER_MAIN"):
    return TokenizedWord(tuple(tokens), start, end, speaker)


def test_multi_token_word_with_epad_and_in_word_padding():
    # start 0.2 s = frame 2.5 -> first piece on frame 2; end 0.5 s -> in-word padding up to int(6.25) = 6
    words = [w([10, 11, 12], 0.2, 0.5)]
    assert build_stream(words, 8, InterleaveConfig()) == [P, E, 10, 11, 12, P, P, P]
    assert build_stream(words, 8, InterleaveConfig(in_word_pad_id=99)) == [P, E, 10, 11, 12, 99, 99, P]


def test_word_at_frame_zero_has_no_epad_and_the_next_word_gets_one():
    assert build_stream([w([10], 0.0, 0.1)], 4, InterleaveConfig()) == [10, P, P, P]
    # frame 1 is in-word padding of the first word (int(1.25) = 1), so it turns into EPAD
    words = [w([10], 0.0, 0.1), w([20], 0.16, 0.2)]
    assert build_stream(words, 4, InterleaveConfig()) == [10, E, 20, P]
    assert build_stream(words, 4, InterleaveConfig(in_word_pad_id=99)) == [10, E, 20, P]


def test_adjacent_words_get_no_epad_between_them():
    words = [w([10, 11], 0.0, 0.16), w([20], 0.16, 0.24)]
    assert build_stream(words, 5, InterleaveConfig()) == [10, 11, 20, P, P]
    assert build_stream(words, 5, InterleaveConfig(in_word_pad_id=99)) == [10, 11, 20, 99, P]


def test_overlapping_word_replaces_the_unemitted_tail_unless_keep_and_shift():
    words = [w([10, 11, 12, 13], 0.0, 0.4), w([20, 21], 0.08, 0.3)]
    # the second word starts on frame 1: pieces 11, 12, 13 are dropped; in-word padding follows it (int(3.75) = 3)
    assert build_stream(words, 7, InterleaveConfig()) == [10, 20, 21, P, P, P, P]
    assert build_stream(words, 7, InterleaveConfig(keep_and_shift=True)) == [10, 11, 12, 13, 20, 21, P]


def test_words_are_sorted_and_empty_durations_dropped():
    words = [w([20], 0.16, 0.24), w([30], 0.1, 0.1), w([10], 0.0, 0.08)]
    assert build_stream(words, 4, InterleaveConfig()) == [10, E, 20, P]


def test_words_past_the_end():
    # starts on frame 5 of 6: EPAD on frame 4, the first piece on frame 5, the rest cut
    assert build_stream([w([10, 11, 12], 0.4, 0.6)], 6, InterleaveConfig()) == [P, P, P, P, E, 10]
    # starts on frame 6: not in the stream at all
    assert build_stream([w([10], 0.48, 0.6)], 6, InterleaveConfig()) == [P] * 6


def test_positive_delay_puts_text_early():
    cfg = InterleaveConfig(delay=0.16)
    # [0.4, 0.6) -> [0.24, 0.44): first piece on frame 3, in-word padding to int(5.5) = 5
    assert build_stream([w([10, 11], 0.4, 0.6)], 7, cfg) == [P, P, E, 10, 11, P, P]
    # a word that ends before the delay is gone
    assert build_stream([w([10], 0.0, 0.1), w([20], 0.4, 0.5)], 5, cfg) == [P, P, E, 20, P]


def test_negative_delay_puts_text_late_with_no_token_at_the_start():
    cfg = InterleaveConfig(delay=-0.16)
    # [0.0, 0.08) -> [0.16, 0.24): frame 2; the first int(0.16 * 12.5) = 2 frames hold no token
    assert build_stream([w([10], 0.0, 0.08)], 5, cfg) == [N, N, 10, P, P]
    assert build_stream([w([10], 0.24, 0.3)], 7, cfg) == [N, N, P, P, E, 10, P]


def test_frames_as_seconds_quirk_lets_a_word_after_the_end_set_epad():
    # moshi-finetune builds ceil(4 * 12.5) = 50 frames and cuts to 4: the word on frame 4 leaves EPAD on frame 3
    words = [w([10], 0.32, 0.4)]
    assert build_stream(words, 4, InterleaveConfig(frames_as_seconds=True)) == [P, P, P, E]
    assert build_stream(words, 4, InterleaveConfig()) == [P, P, P, P]


def test_window_rebases_and_keeps_words_starting_inside():
    words = [AlignedWord("b", 1.0, 1.3), AlignedWord("a", 0.5, 1.1), AlignedWord("c", 2.0, 2.2)]
    got = window(words, 0.8, 0.8)
    assert [(x.word, round(x.start, 6), round(x.end, 6)) for x in got] == [("b", 0.2, 0.5)]


def test_text_stream_with_the_real_tokenizer_and_speakers():
    tok = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    hello, other = tok.encode("hello"), tok.encode("other")
    assert len(hello) == 3 and len(other) == 1
    words = parse_alignments({"alignments": [
        ["old", [0.5, 1.1], "SPEAKER_MAIN"],  # starts before the crop: left out
        [" hello ", [1.0, 1.3], "SPEAKER_MAIN"],  # crop time 0.2 s -> frame 2
        ["zero", [1.5, 1.5], "SPEAKER_MAIN"],  # no duration
        ["other", [1.24, 1.4], "SPEAKER_1"],  # crop time 0.44 s -> frame 5
        ["bye", [2.0, 2.2], "SPEAKER_MAIN"],  # after the crop
    ]})
    cfg = InterleaveConfig()
    main = text_stream(words, tok, 0.8, 10, cfg, speakers="main")
    assert main == [P, E, *hello, P, P, P, P, P]
    assert text_stream(words, tok, 0.8, 10, cfg, speakers="other") == [P, P, P, P, E, *other, P, P, P, P]
    both = text_stream(words, tok, 0.8, 10, cfg, speakers="all")
    assert both == [P, E, hello[0], hello[1], hello[2], *other, P, P, P, P]


def test_bad_alignments_raise_a_clear_error():
    with pytest.raises(AlignmentError, match="alignments"):
        parse_alignments({"words": []})
    with pytest.raises(AlignmentError, match="entry 0"):
        parse_alignments([["hi", "oops"]])
