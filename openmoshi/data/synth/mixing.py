"""Two-channel rendering: segments onto exact-silence channels, loudness normalised per speaker."""

from __future__ import annotations

import io

import numpy as np
import soundfile

from ..format import MOSHI_CHANNEL, SAMPLE_RATE, SPEAKER_MAIN, SPEAKER_USER, USER_CHANNEL, Word
from .scripts import MOSHI
from .turns import Segment

PEAK = 0.97  # -0.26 dBFS: headroom for the 16-bit file


def render(segments: list[Segment], total: int, level_db: float = -20.0) -> np.ndarray:
    """Stereo float32 [T, 2] (channel 0 = Moshi, 1 = user). Each channel's speech is scaled to an RMS of
    `level_db` dBFS measured over its segments (so loudness does not depend on the voice), then limited to a
    peak of PEAK; a channel stays exactly zero while its speaker is quiet."""
    out = np.zeros((total, 2), dtype=np.float32)
    for channel in (MOSHI_CHANNEL, USER_CHANNEL):
        mine = [s for s in segments if (s.speaker == MOSHI) == (channel == MOSHI_CHANNEL)]
        if not mine:
            continue
        energy = sum(float(np.sum(s.speech.audio.astype(np.float64) ** 2)) for s in mine)
        count = sum(len(s.speech.audio) for s in mine)
        rms = np.sqrt(energy / max(count, 1))
        gain = 10 ** (level_db / 20) / max(rms, 1e-9)
        for s in mine:
            out[s.start:s.end, channel] += s.speech.audio * gain
        peak = float(np.max(np.abs(out[:, channel])))
        if peak > PEAK:
            out[:, channel] *= PEAK / peak
    return out


def words_of(segments: list[Segment]) -> list[Word]:
    """Every word with absolute times; Moshi's words are SPEAKER_MAIN, the user's SPEAKER_USER."""
    words = []
    for s in segments:
        speaker = SPEAKER_MAIN if s.speaker == MOSHI else SPEAKER_USER
        offset = s.start / SAMPLE_RATE
        words += [Word(text, offset + a, offset + b, speaker) for text, a, b in s.speech.words]
    return sorted(words, key=lambda w: (w.start, w.end))


def wav_bytes(stereo: np.ndarray) -> bytes:
    """16-bit PCM wav bytes (deterministic: same samples, same bytes)."""
    buf = io.BytesIO()
    soundfile.write(buf, stereo, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()
