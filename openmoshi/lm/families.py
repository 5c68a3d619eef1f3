"""Model families of Kyutai's releases, told apart by config.json's `model_type`, and their run-time settings.

All families share one LM (`LMModel`) and one streaming `Generator`; what differs is how they are fed:

    moshi   user audio in, Moshi text + audio out (full duplex)
    stt     audio in, text out; the text trails the audio by `stt_config.audio_delay_seconds`, learnt in
            training (delays stay 0), so the audio is padded by that much (+1 s) of silence to flush the
            last words, after `audio_silence_prefix_seconds` of silence before it
    tts     text in (forced word by word), audio out, conditioned on a voice
    hibiki  source speech in, translated text + speech out

A `moshi` model may also be a streaming ASR or TTS model through its `delays` alone (paper §5.7): text delayed
behind the audio makes it transcribe, audio delayed behind the text makes it speak (`DelayedMode`).
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


@dataclass(frozen=True)
class DelayedMode:
    """A Moshi-family model (`moshi`, no stt_config / tts_config) used as ASR or TTS through its delays (paper
    §5.7), as config.json's `delays` list gives them, in 80 ms steps: the text stream's delay against that of
    Moshi's semantic stream (the first generated audio codebook; acoustic codebooks keep their own lag).

        delays  [25, 0, 1, 1, ...]   text 2 s behind the audio: "asr" (audio teacher-forced, text generated)
                [0, 25, 26, 26, ...] audio 2 s behind the text: "tts" (text forced word by word, audio generated)
                [0, 0, 1, 1, ...]    Moshi's own delays: neither
    """

    text_delay: int
    audio_delay: int

    @classmethod
    def from_config(cls, cfg: LMConfig) -> DelayedMode | None:
        """The mode of a Moshi-family model with a depth transformer; None for the other families."""
        if cfg.model_type != "moshi" or cfg.stt_config or cfg.tts_config or cfg.dep_q == 0:
            return None
        return cls(cfg.delays[0], cfg.delays[1])

    @property
    def kind(self) -> str | None:
        if self.text_delay > self.audio_delay:
            return "asr"
        if self.audio_delay > self.text_delay:
            return "tts"
        return None

    @property
    def lag(self) -> int:
        """Steps by which the late side trails the other."""
        return abs(self.text_delay - self.audio_delay)


def delayed_mode(cfg: LMConfig, kind: str, command: str) -> DelayedMode | None:
    """The DelayedMode of `kind` ("asr" or "tts") if the model runs that way, None for a model of the command's
    own family; a clear error otherwise."""
    family = {"asr": "stt", "tts": "tts"}[kind]
    if cfg.model_type == family:
        return None
    mode = DelayedMode.from_config(cfg)
    if mode is not None and mode.kind == kind:
        return mode
    late = "text late: delays[0] > delays[1]" if kind == "asr" else "audio late: delays[1] > delays[0]"
    why = f"its delays {cfg.delays[:3]}... do not make it {kind.upper()} ({late})" if mode is not None else \
        f"this one is {cfg.model_type!r} (config.json model_type)"
    raise ConfigError(f"`{command}` needs a {family!r} model, or a Moshi-style model whose delays make it "
                      f"{kind.upper()} ({late}, paper §5.7); {why}. Try `openmoshi init --preset tiny-{family} OUT` "
                      f"or `--preset tiny-moshi-{kind} OUT`")
