"""Moshi's inner monologue as words with timings.

The text stream holds one token per 80 ms frame, mostly PAD; a SentencePiece piece starting with U+2581
opens a new word. A word starts at its first piece's frame and ends after its last piece's frame.

    frame:  0    1    2      3     4    5      6
    token:  PAD  EPAD ▁hel   lo    PAD  ▁you   PAD
    words:            hello [0.16, 0.32)  you [0.40, 0.48)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from array import array
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


class WordGrouper:
    """Groups text tokens, fed one frame at a time, into timed words; memory does not grow with the stream."""

    def __init__(self, tokenizer, frame_rate: float, pad_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.frame_rate, self.pad_ids = tokenizer, frame_rate, pad_ids
        self.vocab = tokenizer.get_piece_size()
        self.frame = 0
        self.current: Word | None = None

    def is_spoken(self, token: int) -> bool:
        return not (token in self.pad_ids or token < 0 or token >= self.vocab or self.tokenizer.is_control(token))

    def add(self, token: int) -> Word | None:
        """Feeds the next frame's token; returns the word it closed, if any (words that decode to nothing are
        dropped)."""
        frame, self.frame = self.frame, self.frame + 1
        if not self.is_spoken(token):
            return None
        start, end = frame / self.frame_rate, (frame + 1) / self.frame_rate
        if self.current is None or self.tokenizer.id_to_piece(token).startswith(WORD_START):
            done, self.current = self.current, Word("", start, end, [token])
            return self._close(done)
        self.current.tokens.append(token)
        self.current.end = end
        return None

    def finish(self) -> Word | None:
        done, self.current = self.current, None
        return self._close(done)

    def _close(self, word: Word | None) -> Word | None:
        if word is None:
            return None
        word.word = self.tokenizer.decode(word.tokens).strip()
        return word if word.word else None


def transcript_from_tokens(tokens: list[int], tokenizer, frame_rate: float, pad_ids: tuple[int, ...]) -> Transcript:
    """Group the non-padding text tokens (one per frame) into timed words."""
    grouper = WordGrouper(tokenizer, frame_rate, pad_ids)
    words = [w for w in map(grouper.add, tokens) if w is not None]
    last = grouper.finish()
    words += [last] if last is not None else []
    spoken = [t for t in tokens if grouper.is_spoken(t)]
    return Transcript(tokenizer.decode(spoken), words, list(tokens))


class TranscriptWriter:
    """Writes `Transcript.to_json()` of a token stream of any length to `path` with bounded memory: finished
    words go to a spool file as they close, token ids are kept as 4-byte ints (the decoded text needs them all).

        writer = TranscriptWriter(path, tokenizer, 12.5, pad_ids)
        for token in stream: writer.add(token)
        writer.close()   # writes path; writer.words counts the words
    """

    def __init__(self, path, tokenizer, frame_rate: float, pad_ids: tuple[int, ...]) -> None:
        self.path = path
        self.grouper = WordGrouper(tokenizer, frame_rate, pad_ids)
        self.tokens = array("i")
        self.spoken = array("i")
        self.spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.words = 0
        self.text = ""  # set by close()

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.grouper.is_spoken(token):
            self.spoken.append(token)
        self._spool(self.grouper.add(token))

    def _spool(self, word: Word | None) -> None:
        if word is not None:
            self.spool.write(("" if self.words == 0 else ",\n") + "    " + json.dumps(asdict(word)))
            self.words += 1

    def close(self) -> None:
        self._spool(self.grouper.finish())
        self.text = text = self.grouper.tokenizer.decode(self.spoken.tolist())
        self.spool.seek(0)
        with open(self.path, "w", encoding="utf-8") as out:
            out.write('{\n  "text": ' + json.dumps(text) + ',\n  "words": [\n')
            shutil.copyfileobj(self.spool, out)
            out.write('\n  ],\n  "tokens": [')
            for i in range(0, len(self.tokens), 1024):
                out.write(("" if i == 0 else ", ") + ", ".join(map(str, self.tokens[i:i + 1024])))
            out.write("]\n}\n")
        self.spool.close()
