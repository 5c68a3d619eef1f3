"""Model families of Kyutai's releases, told apart by config.json's `model_type`, and their run-time settings.

All families share one LM (`LMModel`) and one streaming `Generator`; what differs is how they are fed:

    moshi   user audio in, Moshi text + audio out (full duplex)
    stt     audio in, text out; the text trails the audio by `stt_config.audio_delay_seconds`, learnt in
            training (delays stay 0), so the audio is padded by that much (+1 s) of silence to flush the
            last words, after `audio_silence_prefix_seconds` of silence before it
    tts     text in (forced word by word), audio out, conditioned on a voice
    hibiki  source speech in, translated text + speech out
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .config import LMConfig

FAMILIES = ("moshi", "hibiki", "stt", "tts")


def check_family(cfg: LMConfig, expected: str, command: str) -> None:
    """Raise a clear error when a command gets a model of another family."""
    if cfg.model_type != expected:
        raise ConfigError(f"`{command}` needs a {expected!r} model, this one is {cfg.model_type!r} "
                          f"(config.json model_type); use a {expected} model such as "
                          f"`openmoshi init --preset tiny-{expected} OUT`")


@dataclass(frozen=True)
class SttSettings:
    """How a speech-to-text model is fed (Kyutai's `stt_config`)."""

    audio_delay_s: float = 0.0  # how far the text trails the audio
    silence_prefix_s: float = 0.0  # silence fed before the audio

    @classmethod
    def from_config(cls, cfg: LMConfig) -> SttSettings:
        raw = cfg.stt_config or {}
        values = {}
        for key, name in (("audio_delay_seconds", "audio_delay_s"), ("audio_silence_prefix_seconds",
                                                                      "silence_prefix_s")):
            value = raw.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"stt_config.{key} must be a number of seconds >= 0, got {value!r}")
            values[name] = float(value)
        return cls(**values)

    def prefix_samples(self, sample_rate: int) -> int:
        return int(self.silence_prefix_s * sample_rate)

    def flush_samples(self, sample_rate: int) -> int:
        """Silence fed after the audio so the delayed text of its end comes out (delay + 1 s, as Kyutai)."""
        return int((self.audio_delay_s + 1.0) * sample_rate)

    @property
    def text_offset_s(self) -> float:
        """Subtract from a text token's stream time to get the time of the words in the input audio."""
        return self.silence_prefix_s + self.audio_delay_s
