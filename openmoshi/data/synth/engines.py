"""Speech synthesizers with exact word timings: espeak-ng (in process, word events) and festival (segment times).

A synthesizer turns one chunk of text (a clause without inner punctuation pauses) into 24 kHz mono audio plus
each word's [start, end] in seconds. The times come from the synthesizer itself: espeak-ng reports the sample at
which each word starts; festival reports the start and end of each word's phone segments. The only measurement
we add is trimming the silent samples at the edges of a word's span (espeak-ng's span of a word runs until the
next word starts), which moves a boundary to the first or last sample the synthesizer actually made non-silent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

from ...errors import OpenMoshiError
from ..format import SAMPLE_RATE

logger = logging.getLogger(__name__)

_SILENCE = 1e-3  # |sample| below this is silence when trimming a word's span (about -60 dBFS)


class SynthesisError(OpenMoshiError):
    """A synthesizer is missing or failed on some text."""


@dataclass
class Voice:
    """One synthetic voice: engine, voice name, and prosody settings.

    espeak-ng: `name` is a voice with an optional variant (`en-us+f3`); pitch 0-99 (50 = voice default), rate in
    words per minute (175 default), pitch range 0-99. festival: `name` is a voice (`kal_diphone`); rate scales
    the speaking rate through festival's Duration_Stretch (rate/175), pitch and range are ignored.
    """

    engine: str
    name: str
    pitch: int = 50
    rate: int = 175
    range: int = 50

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}:p{self.pitch}:r{self.rate}:g{self.range}"

    @staticmethod
    def parse(spec: str) -> Voice:
        """`espeak:en-us+m3:p40:r160:g50` (the form `key` writes); pitch/rate/range parts are optional."""
        parts = spec.split(":")
        if len(parts) < 2 or parts[0] not in ("espeak", "festival"):
            raise SynthesisError(f"voice {spec!r}: expected ENGINE:NAME[:pPITCH][:rRATE][:gRANGE] with ENGINE "
                                 "espeak or festival, e.g. espeak:en-us+m3:p45:r170")
        voice = Voice(parts[0], parts[1])
        fields = {"p": "pitch", "r": "rate", "g": "range"}
        for part in parts[2:]:
            if part[:1] not in fields or not part[1:].isdigit():
                raise SynthesisError(f"voice {spec!r}: unknown setting {part!r} (use p45, r170, g50)")
            setattr(voice, fields[part[0]], int(part[1:]))
        return voice


@dataclass
class Speech:
    """Synthesized chunk: audio [T] float32 at 24 kHz, trimmed to its first and last non-silent sample, and its
    words with times in seconds from the start of `audio`."""

    audio: np.ndarray
    words: list[tuple[str, float, float]]

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def to_24k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Polyphase resampling to 24 kHz (times in seconds are unchanged by it)."""
    if rate == SAMPLE_RATE:
        return audio.astype(np.float32)
    from scipy.signal import resample_poly
    ratio = Fraction(SAMPLE_RATE, rate)
    return resample_poly(audio.astype(np.float64), ratio.numerator, ratio.denominator).astype(np.float32)


def _nonsilent_bounds(audio: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    loud = np.flatnonzero(np.abs(audio[start:end]) > _SILENCE)
    if len(loud) == 0:
        return None
    return start + int(loud[0]), start + int(loud[-1]) + 1


def _finish(audio: np.ndarray, rate: int, spans: list[tuple[str, int, int]]) -> Speech:
    """Trim each word's sample span to its non-silent samples, resample to 24 kHz, cut the chunk to its words."""
    words = []
    for text, start, end in spans:
        bounds = _nonsilent_bounds(audio, start, end)
        if bounds is None:  # a word the synthesizer made silent: fold its text into the previous word
            if words:
                prev = words[-1]
                words[-1] = (f"{prev[0]} {text}", prev[1], prev[2])
            continue
        words.append((text, bounds[0], bounds[1]))
    if not words:
        raise SynthesisError(f"the synthesizer produced only silence for {' '.join(s[0] for s in spans)!r}")
    first, last = words[0][1], words[-1][2]
    audio24 = to_24k(audio[first:last], rate)
    scale = SAMPLE_RATE / rate
    out_words = []
    for text, start, end in words:
        s = round((start - first) * scale) / SAMPLE_RATE
        e = min(round((end - first) * scale), len(audio24)) / SAMPLE_RATE
        out_words.append((text, s, e))
    return Speech(audio24, out_words)


# --- espeak-ng, in process through libespeak-ng's synchronous API -----------------------------------------------

class _EspeakEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_EspeakEvent))
_EVENT_WORD, _EVENT_LIST_END = 1, 0
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER ids
_AUDIO_OUTPUT_SYNCHRONOUS, _INIT_DONT_EXIT = 0x02, 0x8000


class EspeakEngine:
    """libespeak-ng loaded once per process; `speak` returns audio and each word's start sample."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise SynthesisError("libespeak-ng is not installed; install it (Debian/Ubuntu: apt-get install "
                                 "espeak-ng) or use festival voices only") from exc
        self.rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_DONT_EXIT)
        if self.rate <= 0:
            raise SynthesisError("libespeak-ng failed to initialise (is espeak-ng-data installed?)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int]] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: the C side holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

    def _on_audio(self, wav, count, events) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_END:
            if events[i].type == _EVENT_WORD:
                self._events.append((events[i].text_position, events[i].sample))
            i += 1
        return 0

    def synthesize(self, words: list[str], voice: Voice) -> Speech:
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise SynthesisError(f"espeak-ng has no voice {voice.name!r} (see `espeak-ng --voices`)")
        for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        text = " ".join(words)
        data = text.encode()
        offsets, pos = [], 0  # 1-based character positions of each word, as espeak reports them
        for w in words:
            offsets.append(len(text[:pos].encode()) + 1)
            pos += len(w) + 1
        self._chunks, self._events = [], []
        self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            raise SynthesisError(f"espeak-ng produced no audio for {text!r}")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        # first word event at or after each word's first character: the sample where that word starts
        starts: list[int | None] = []
        for k, off in enumerate(offsets):
            nxt = offsets[k + 1] if k + 1 < len(offsets) else 1 << 30
            hits = [s for p, s in self._events if off <= p < nxt]
            starts.append(min(hits) if hits else None)
        spans: list[tuple[str, int, int]] = []
        for k, w in enumerate(words):
            if starts[k] is None:  # no event for this word (rare): it is spoken within the previous word's span
                if spans:
                    spans[-1] = (f"{spans[-1][0]} {w}", spans[-1][1], spans[-1][2])
                    continue
                starts[k] = 0
            end = next((s for s in starts[k + 1:] if s is not None), len(audio))
            spans.append((w, starts[k], end))
        return _finish(audio, self.rate, spans)


# --- festival, one batch process per list of chunks --------------------------------------------------------------

_FESTIVAL_SCRIPT = """(set! tok (utt.relation.first utt 'Token))
(while tok
  (set! st -1) (set! en -1)
  (mapcar (lambda (w)
    (let ((s (item.relation w 'SylStructure)))
      (if (and s (item.daughters s))
        (begin
          (if (< st 0) (set! st (item.feat s "daughter1.daughter1.segment_start")))
          (set! en (item.feat s "daughtern.daughtern.segment_end"))))))
    (item.daughters tok))
  (format t "W\\t%s\\t%f\\t%f\\n" (item.name tok) st en)
  (set! tok (item.next tok)))
"""


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@lru_cache(maxsize=1)
def festival_available() -> bool:
    return shutil.which("festival") is not None


@lru_cache(maxsize=None)
def festival_voices() -> tuple[str, ...]:
    """Installed festival voices (empty when festival is absent)."""
    if not festival_available():
        return ()
    out = subprocess.run(["festival", "--batch", "(format t \"%l\\n\" (voice.list))"], capture_output=True,
                         text=True, timeout=60).stdout.strip()
    return tuple(sorted(out.strip("()").split())) if out else ()


class FestivalEngine:
    """Runs `festival --batch` once for a list of chunks: each chunk's wave and its tokens' segment times."""

    def synthesize_many(self, chunks: list[list[str]], voice: Voice) -> list[Speech]:
        if not festival_available():
            raise SynthesisError("festival is not installed (Debian/Ubuntu: apt-get install festival "
                                 "festvox-kallpc16k); or use espeak voices only")
        with tempfile.TemporaryDirectory(prefix="openmoshi-festival-") as tmp:
            lines = [f"(voice_{voice.name})", f"(Parameter.set 'Duration_Stretch {175.0 / max(voice.rate, 1):.4f})"]
            for i, words in enumerate(chunks):
                wav = Path(tmp) / f"{i}.wav"
                lines += [f'(format t "C\\t{i}\\n")', f"(set! utt (Utterance Text {_scheme_string(' '.join(words))}))",
                          "(utt.synth utt)", f"(utt.save.wave utt {_scheme_string(str(wav))} 'riff)",
                          _FESTIVAL_SCRIPT]
            script = Path(tmp) / "run.scm"
            script.write_text("\n".join(lines) + "\n")
            proc = subprocess.run(["festival", "--batch", str(script)], capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0 or "C\t" not in proc.stdout:
                raise SynthesisError(f"festival failed with voice {voice.name!r}: {proc.stderr.strip()[-400:]}")
            tokens: dict[int, list[tuple[str, float, float]]] = {}
            current = -1
            for line in proc.stdout.splitlines():
                parts = line.split("\t")
                if parts[0] == "C":
                    current = int(parts[1])
                    tokens[current] = []
                elif parts[0] == "W" and len(parts) == 4 and current >= 0:
                    tokens[current].append((parts[1], float(parts[2]), float(parts[3])))
            out = []
            for i, words in enumerate(chunks):
                audio, rate = soundfile.read(Path(tmp) / f"{i}.wav", dtype="float32")
                if audio.ndim > 1:
                    audio = audio.mean(axis=1)
                toks = [t for t in tokens.get(i, []) if t[1] >= 0 and t[2] > t[1]]
                spoken = [t[0] for t in tokens.get(i, [])]
                # festival drops nothing it was given when every token carried speech: keep our spelling then
                names = words if len(toks) == len(words) == len(spoken) else [t[0] for t in toks]
                spans = [(name, int(round(s * rate)), int(round(e * rate))) for name, (_, s, e) in zip(names, toks)]
                out.append(_finish(audio, rate, spans))
            return out


class Synthesizer:
    """Both engines behind one call; espeak-ng is loaded lazily, once per process."""

    def __init__(self) -> None:
        self._espeak: EspeakEngine | None = None
        self._festival = FestivalEngine()

    def synthesize_many(self, chunks: list[list[str]], voice: Voice) -> list[Speech]:
        if voice.engine == "espeak":
            if self._espeak is None:
                self._espeak = EspeakEngine()
            return [self._espeak.synthesize(words, voice) for words in chunks]
        if voice.engine == "festival":
            return self._festival.synthesize_many(chunks, voice) if chunks else []
        raise SynthesisError(f"unknown synthesis engine {voice.engine!r} (espeak or festival)")
