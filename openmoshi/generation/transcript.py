"""Moshi's inner monologue as words with timings.

The text stream holds one token per 80 ms frame, mostly PAD; a SentencePiece piece starting with U+2581
opens a new word. A word starts at its first piece's frame and ends after its last piece's frame.

    frame:  0    1    2      3     4    5      6
    token:  PAD  EPAD ▁hel   lo    PAD  ▁you   PAD
    words:            hello [0.16, 0.32)  you [0.40, 0.48)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

WORD_START = "\u2581"


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float  # seconds
    tokens: list[int] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    words: list[Word]
    tokens: list[int]  # every text token, one per frame, PAD and EPAD included

    def to_json(self) -> dict:
        return {"text": self.text, "words": [asdict(w) for w in self.words], "tokens": self.tokens}


def transcript_from_tokens(tokens: list[int], tokenizer, frame_rate: float, pad_ids: tuple[int, ...]) -> Transcript:
    """Group the non-padding text tokens (one per frame) into timed words."""
    words: list[Word] = []
    spoken: list[int] = []
    for frame, token in enumerate(tokens):
        if token in pad_ids or token < 0 or token >= tokenizer.get_piece_size() or tokenizer.is_control(token):
            continue
        spoken.append(token)
        piece = tokenizer.id_to_piece(token)
        start, end = frame / frame_rate, (frame + 1) / frame_rate
        if piece.startswith(WORD_START) or not words:
            words.append(Word("", start, end, [token]))
        else:
            words[-1].tokens.append(token)
            words[-1].end = end
    for word in words:
        word.word = tokenizer.decode(word.tokens).strip()
    return Transcript(tokenizer.decode(spoken), [w for w in words if w.word], list(tokens))
