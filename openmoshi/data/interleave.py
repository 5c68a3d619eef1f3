"""The Inner Monologue: word alignments -> a text stream time-aligned with the audio, one token per 80 ms frame.

Placement is moshi-finetune's (its `Interleaver`), token for token:

    words:   "hello" [0.16, 0.40)  -> pieces ▁hel lo        "you" [0.40, 0.48) -> ▁you
    frame:   0     1     2     3     4     5     6
    token:   PAD   EPAD  ▁hel  lo    PAD   ▁you  PAD

- a word's pieces start at the first frame t with start * frame_rate < t + 1, one piece per frame;
- a word that starts while the previous one still has pieces to emit replaces that unemitted tail
  (`keep_and_shift` queues it behind the tail instead);
- the frame before a word's first piece becomes EPAD, only when that frame holds padding;
- frames after a word's last piece up to int(end * frame_rate) hold `in_word_pad_id` (PAD by default);
- a delay shifts the words against the audio: positive = text early (TTS-style), negative = text late
  (ASR-style, the first frames then hold no token).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OpenMoshiError

NO_TOKEN = -1  # a frame without any text input (zero embedding, no loss)
MAIN_SPEAKER = "SPEAKER_MAIN"


class AlignmentError(OpenMoshiError):
    """Word alignments that cannot be read."""


@dataclass(frozen=True)
class AlignedWord:
    """One word of an alignment: text, start and end in seconds, speaker label."""

    word: str
    start: float
    end: float
    speaker: str = MAIN_SPEAKER


@dataclass(frozen=True)
class TokenizedWord:
    tokens: tuple[int, ...]
    start: float
    end: float
    speaker: str = MAIN_SPEAKER


@dataclass
class InterleaveConfig:
    """How words become the text stream (defaults: Moshi's special tokens and moshi-finetune's behaviour)."""

    frame_rate: float = 12.5
    pad_id: int = 3  # PAD: no text on this frame
    epad_id: int = 0  # EPAD: the next frame starts a word
    in_word_pad_id: int | None = None  # padding after a word's last piece until its end (None = pad_id)
    no_token_id: int = NO_TOKEN  # frames without any text input
    keep_and_shift: bool = False  # queue a new word behind the unemitted pieces of the previous one
    delay: float = 0.0  # seconds; > 0 the text runs ahead of the audio, < 0 it lags behind
    main_speaker: str = MAIN_SPEAKER
    # moshi-finetune's InterleavedTokenizer passes a frame count where seconds are expected: the stream is
    # built ceil(frames * frame_rate) frames long, then cut to the audio. Off = the stream is as long as the audio.
    frames_as_seconds: bool = False

    @property
    def in_word_pad(self) -> int:
        return self.pad_id if self.in_word_pad_id is None else self.in_word_pad_id


def parse_alignments(raw: Any, source: str = "alignments") -> list[AlignedWord]:
    """moshi-finetune's alignments: [[word, [start, end], speaker], ...] (speaker optional) -> words."""
    if isinstance(raw, dict):
        if "alignments" not in raw:
            raise AlignmentError(f"{source}: no 'alignments' key (expected {{\"alignments\": [[word, [start, end], "
                                 "speaker], ...]}})")
        raw = raw["alignments"]
    if not isinstance(raw, list):
        raise AlignmentError(f"{source}: alignments must be a list of [word, [start, end], speaker]")
    words = []
    for i, item in enumerate(raw):
        try:
            word, (start, end), *rest = item
            speaker = str(rest[0]) if rest else MAIN_SPEAKER
            words.append(AlignedWord(str(word), float(start), float(end), speaker))
        except (TypeError, ValueError) as exc:
            raise AlignmentError(f"{source}: entry {i} ({item!r}) is not [word, [start, end], speaker]") from exc
    return words


def window(words: Sequence[AlignedWord], start: float, duration: float) -> list[AlignedWord]:
    """The words starting in [start, start + duration), times re-based to the window (moshi-finetune's slicing:
    a word that began before the window is left out, as is one that starts after it)."""
    ordered = sorted(words, key=lambda w: w.start)
    starts = [w.start for w in ordered]
    first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, start + duration)
    return [AlignedWord(w.word, w.start - start, w.end - start, w.speaker) for w in ordered[first:last]]


def tokenize_words(words: Sequence[AlignedWord], tokenizer) -> list[TokenizedWord]:
    """Each word on its own, stripped, no BOS (newlines inside a word become the tokenizer's newline piece)."""
    newline = tokenizer.encode("\n")[-1:]  # empty when the vocabulary has no newline piece
    out = []
    for w in words:
        tokens: list[int] = []
        for j, line in enumerate(w.word.strip().split("\n")):
            if j:
                tokens.extend(newline)
            tokens.extend(tokenizer.encode(line))
        out.append(TokenizedWord(tuple(tokens), w.start, w.end, w.speaker))
    return out


def select_speakers(words: Sequence[TokenizedWord], speakers: str, main_speaker: str = MAIN_SPEAKER
                    ) -> list[TokenizedWord]:
    """'main': the main speaker's words; 'other': everybody else's; 'all': every word."""
    if speakers == "all":
        return list(words)
    if speakers == "main":
        return [w for w in words if w.speaker == main_speaker]
    if speakers == "other":
        return [w for w in words if w.speaker != main_speaker]
    raise OpenMoshiError(f"speakers must be 'main', 'other' or 'all', got {speakers!r}")


def build_stream(words: Sequence[TokenizedWord], num_frames: int, cfg: InterleaveConfig) -> list[int]:
    """Place tokenized words (sorted by start, times in seconds from the stream's first frame) on num_frames
    frames -> one token per frame. Words of zero or negative duration are dropped; the delay is applied here."""
    rate = cfg.frame_rate
    kept = [w for w in sorted(words, key=lambda w: w.start) if w.start < w.end]
    if cfg.delay:
        kept = [TokenizedWord(w.tokens, w.start - cfg.delay, w.end - cfg.delay, w.speaker)
                for w in kept if w.end > cfg.delay]
    length = math.ceil(num_frames * rate) if cfg.frames_as_seconds else num_frames
    tokens = [cfg.pad_id] * length
    pending: deque[int] = deque()
    last_word_end = -1
    i = 0
    for t in range(length):
        while i < len(kept) and kept[i].start * rate < t + 1:
            if cfg.keep_and_shift:
                pending.extend(kept[i].tokens)
            else:
                pending = deque(kept[i].tokens)
            last_word_end = int(kept[i].end * rate)
            i += 1
        if pending:
            if t > 0 and tokens[t - 1] in (cfg.pad_id, cfg.in_word_pad):
                tokens[t - 1] = cfg.epad_id
            tokens[t] = pending.popleft()
        elif t <= last_word_end:
            tokens[t] = cfg.in_word_pad
    if cfg.delay < 0:
        prefix = min(int(rate * -cfg.delay), length)
        tokens[:prefix] = [cfg.no_token_id] * prefix
    if len(tokens) >= num_frames:
        return tokens[:num_frames]
    return tokens + [cfg.no_token_id] * (num_frames - len(tokens))


def text_stream(words: Sequence[AlignedWord], tokenizer, start: float, num_frames: int, cfg: InterleaveConfig,
                speakers: str = "main") -> list[int]:
    """The text stream of the crop starting at `start` seconds, num_frames frames long (the whole of
    moshi-finetune's pipeline: window, re-base, tokenize, speaker selection, placement)."""
    crop = window(words, start, num_frames / cfg.frame_rate)
    chosen = select_speakers(tokenize_words(crop, tokenizer), speakers, cfg.main_speaker)
    return build_stream(chosen, num_frames, cfg)
