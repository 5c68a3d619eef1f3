"""A teacher made from word alignments, for codecs trained where no WavLM / HuBERT weights are at hand.

Each audio file's alignment (NAME.json beside it, moshi-finetune's format) gives its words' times; each word is
split into units (its phonemes from espeak-ng, or its letters) spread evenly over the word's interval. A unit
has a fixed pseudo-random embedding (drawn from a hash of its symbol, so every run and process agrees), and so
does silence. The target of Mimi frame f, covering [f, f + 1) * 80 ms, is the sum of the embeddings of what
sounds in it, each weighted by how long it sounds there:

    words [(text, start, end)] -> units [(symbol, start, end)] -> target [F, D]

Distilled into the semantic level (cosine distance, as for WavLM), this asks codebook 0 to say which sounds are
being spoken, whoever speaks them: a text-supervised semantic token, like a phone recogniser's.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import soundfile as sf
import torch

from ...data.format import read_alignments
from ...errors import ConfigError

UNITS = ("phonemes", "letters")
SILENCE = "<sil>"
_STRESS = re.compile(r"[',%=]")


@lru_cache(maxsize=None)
def unit_embedding(symbol: str, dim: int) -> torch.Tensor:
    """A fixed unit-norm vector [dim] for `symbol`, the same in every process (seeded by its hash)."""
    seed = int.from_bytes(hashlib.sha1(symbol.encode()).digest()[:8], "little") % (2**63 - 1)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def normalise_word(text: str) -> str:
    return re.sub(r"[^\w']", "", text.lower())


@lru_cache(maxsize=None)
def espeak_phonemes(word: str, voice: str = "en-us") -> tuple[str, ...]:
    """espeak-ng's phoneme mnemonics of one word, stress marks removed ("capital" -> k a p I t# @L)."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", voice, word], capture_output=True,
                         text=True, check=True).stdout
    return tuple(p for p in (_STRESS.sub("", s) for s in re.split(r"[_\s]+", out)) if p)


def frame_overlaps(spans: list[tuple[str, float, float]], num_frames: int, frame_seconds: float):
    """(frame, symbol, seconds) for every unit span and frame of [0, num_frames) it sounds in."""
    for symbol, start, end in spans:
        first, last = int(start / frame_seconds), min(num_frames - 1, int(end / frame_seconds))
        for f in range(first, last + 1):
            overlap = min(end, (f + 1) * frame_seconds) - max(start, f * frame_seconds)
            if overlap > 0:
                yield f, symbol, overlap


class AlignmentTeacher:
    """Targets [F, D] per audio file from its word alignments (see the module's docstring)."""

    def __init__(self, units: str = "phonemes", dim: int = 256, voice: str = "en-us") -> None:
        if units not in UNITS:
            raise ConfigError(f"alignment teacher units must be one of {UNITS}, got {units!r}")
        if units == "phonemes" and shutil.which("espeak-ng") is None:
            raise ConfigError("the phoneme teacher needs espeak-ng (apt install espeak-ng), or use the teacher "
                              "'letters'")
        self.units, self.dim, self.voice = units, int(dim), voice
        self.source = units

    def key(self) -> str:
        return hashlib.sha1(f"alignments|{self.units}|{self.dim}|{self.voice}".encode()).hexdigest()[:12]

    def word_units(self, text: str) -> tuple[str, ...]:
        word = normalise_word(text)
        if not word:
            return ()
        if self.units == "letters":
            return tuple(word)
        return espeak_phonemes(word, self.voice)

    def unit_spans(self, words) -> list[tuple[str, float, float]]:
        """[(symbol, start, end)]: each word's units share its interval evenly."""
        spans = []
        for w in words:
            units = self.word_units(w.text)
            if not units or w.end <= w.start:
                continue
            step = (w.end - w.start) / len(units)
            spans += [(u, w.start + i * step, w.start + (i + 1) * step) for i, u in enumerate(units)]
        return spans

    def targets(self, spans: list[tuple[str, float, float]], num_frames: int, frame_seconds: float) -> torch.Tensor:
        """[num_frames, dim]: per frame, the time-weighted sum of its units' embeddings, silence for the rest."""
        out = torch.zeros(num_frames, self.dim)
        covered = torch.zeros(num_frames)
        for f, symbol, overlap in frame_overlaps(spans, num_frames, frame_seconds):
            out[f] += overlap * unit_embedding(symbol, self.dim)
            covered[f] += overlap
        silence = (frame_seconds - covered).clamp_min(0.0)
        return out + silence[:, None] * unit_embedding(SILENCE, self.dim)

    def file_features(self, audio: Path, frame_size: int, sample_rate: int) -> torch.Tensor:
        """[F, dim] for the whole file, F = ceil(samples at sample_rate / frame_size), as Mimi counts frames."""
        audio = Path(audio)
        info = sf.info(str(audio))
        samples = round(info.frames * sample_rate / info.samplerate)
        frames = -(-samples // frame_size)
        words = read_alignments(audio.with_suffix(".json"))
        return self.targets(self.unit_spans(words), frames, frame_size / sample_rate)
