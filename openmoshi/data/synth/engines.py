"""Speech synthesizers with exact word timings: espeak-ng (libespeak-ng word events) and festival (segment times).

A synthesizer turns one chunk of text (a clause without inner punctuation pauses) into 24 kHz mono audio plus
each word's [start, end] in seconds. The times come from the synthesizer itself: espeak-ng reports the sample at
which each word starts; festival reports the start and end of each word's phone segments. The only measurement
we add is trimming the silent samples at the edges of a word's span (espeak-ng's span of a word runs until the
next word starts), which moves a boundary to the first or last sample the synthesizer actually made non-silent.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from functools import cache, lru_cache
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
    scale = SAMPLE_RATE / rate
    audio24 = to_24k(audio[first:last], rate)
    length = round((last - first) * scale)  # the polyphase filter may give one sample more
    audio24 = np.pad(audio24[:length], (0, max(0, length - len(audio24))))
    out_words = []
    for text, start, end in words:
        s = round((start - first) * scale) / SAMPLE_RATE
        e = min(round((end - first) * scale), len(audio24)) / SAMPLE_RATE
        out_words.append((text, s, e))
    return Speech(audio24, out_words)


# --- espeak-ng: libespeak-ng word events, in a fresh process per batch (see _espeak_process.py) ----------------

_ESPEAK_SCRIPT = Path(__file__).with_name("_espeak_process.py")


@lru_cache(maxsize=1)
def espeak_available() -> bool:
    return ctypes.util.find_library("espeak-ng") is not None


def _espeak_spans(words: list[str], text: str, events: list[list[int]], total: int) -> list[tuple[str, int, int]]:
    """Each word's sample span: from its word event to the next word's (the last runs to the end)."""
    offsets, pos = [], 0  # 1-based character (not byte) positions of each word, as espeak-ng reports them
    for w in words:
        offsets.append(pos + 1)
        pos += len(w) + 1
    starts: list[int | None] = []
    for k, off in enumerate(offsets):
        nxt = offsets[k + 1] if k + 1 < len(offsets) else 1 << 30
        hits = [sample for p, sample in events if off <= p < nxt]
        starts.append(min(hits) if hits else None)
    spans: list[tuple[str, int, int]] = []
    for k, w in enumerate(words):
        if starts[k] is None:  # no event for this word (rare): it is spoken within the previous word's span
            if spans:
                spans[-1] = (f"{spans[-1][0]} {w}", spans[-1][1], spans[-1][2])
                continue
            starts[k] = 0
        end = next((s for s in starts[k + 1:] if s is not None), total)
        spans.append((w, starts[k], end))
    return spans


def espeak_synthesize(jobs: list[tuple[list[str], Voice]]) -> list[Speech]:
    """Synthesize every (words, voice) job in one fresh espeak-ng process, in order."""
    if not jobs:
        return []
    if not espeak_available():
        raise SynthesisError("libespeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    payload = [{"text": " ".join(words), "voice": v.name, "rate": v.rate, "pitch": v.pitch, "range": v.range}
               for words, v in jobs]
    proc = subprocess.run([sys.executable, str(_ESPEAK_SCRIPT)], check=False, input=json.dumps(payload).encode(),
                          capture_output=True, timeout=600)
    data, pos, out = proc.stdout, 0, []
    for (words, voice), job in zip(jobs, payload):
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise SynthesisError(f"espeak-ng stopped early: {proc.stderr.decode(errors='replace')[-400:]}")
        header = json.loads(data[pos:nl])
        if "fatal" in header:
            raise SynthesisError(header["fatal"] + "; install espeak-ng (apt-get install espeak-ng)")
        if header["error"]:
            raise SynthesisError(header["error"])
        n = header["samples"]
        audio = np.frombuffer(data[nl + 1:nl + 1 + 2 * n], dtype="<i2").astype(np.float32) / 32768.0
        pos = nl + 1 + 2 * n
        if n == 0:
            raise SynthesisError(f"espeak-ng produced no audio for {job['text']!r}")
        out.append(_finish(audio, header["rate"], _espeak_spans(words, job["text"], header["words"], n)))
    return out


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


@cache
def festival_voices() -> tuple[str, ...]:
    """Installed festival voices (empty when festival is absent)."""
    if not festival_available():
        return ()
    out = subprocess.run(["festival", "--batch", "(format t \"%l\\n\" (voice.list))"], check=False,
                         capture_output=True, text=True, timeout=60).stdout.strip()
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
            proc = subprocess.run(["festival", "--batch", str(script)], check=False, capture_output=True, text=True,
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
                spans = [(name, round(s * rate), round(e * rate)) for name, (_, s, e) in zip(names, toks)]
                out.append(_finish(audio, rate, spans))
            return out


def synthesize(jobs: list[tuple[list[str], Voice]]) -> list[Speech]:
    """Synthesize (words, voice) jobs, results in order: espeak-ng jobs in one fresh process, festival jobs in one
    process per voice."""
    out: list[Speech | None] = [None] * len(jobs)
    espeak = [i for i, (_, v) in enumerate(jobs) if v.engine == "espeak"]
    for i, speech in zip(espeak, espeak_synthesize([jobs[i] for i in espeak])):
        out[i] = speech
    festival = FestivalEngine()
    for name in sorted({v.key for _, v in jobs if v.engine == "festival"}):
        idx = [i for i, (_, v) in enumerate(jobs) if v.key == name]
        for i, speech in zip(idx, festival.synthesize_many([jobs[i][0] for i in idx], jobs[idx[0]][1])):
            out[i] = speech
    unknown = [v.engine for _, v in jobs if v.engine not in ("espeak", "festival")]
    if unknown:
        raise SynthesisError(f"unknown synthesis engine {unknown[0]!r} (espeak or festival)")
    return [s for s in out if s is not None]
