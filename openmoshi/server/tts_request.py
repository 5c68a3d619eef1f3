"""What a /api/tts_streaming client asks for: its query (voice, format, sampling) and the voice file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProtocolError
from ..generation.tts import MAX_SPEAKERS
from .tts_format import DEFAULT_FORMAT, check_format


@dataclass
class TtsOptions:
    """Server-side TTS defaults; a session may change temperature, top-k, seed, guidance and its step limit in
    its query."""

    voice_dir: Path | None = None
    default_voice: str | None = None
    temperature: float = 0.6
    cfg_coef: float = 2.0
    max_seconds: float = 300.0  # audio of one session


def resolve_voice(root: Path, name: str) -> Path:
    """NAME inside root: the file itself, NAME.safetensors, or NAME.<anything>.safetensors (Kyutai's tts-voices
    names its embeddings `voice.wav.1e68beda@240.safetensors` and its clients ask for `voice.wav`)."""
    root = root.resolve()
    if not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise ProtocolError(f"voice {name!r}: give a path inside the voice folder")
    base = (root / name).resolve()
    if root not in base.parents:
        raise ProtocolError(f"voice {name!r}: give a path inside the voice folder")
    candidates = [base] if base.suffix in (".safetensors", ".sft") else []
    candidates += [base.with_name(base.name + ".safetensors")]
    candidates += sorted(base.parent.glob(glob_escape(base.name) + ".*.safetensors")) if base.parent.is_dir() else []
    for path in candidates:
        if path.is_file():
            return path
    raise ProtocolError(f"no voice {name!r} in the server's voice folder")


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


MAX_SEED = 2**64 - 1  # Kyutai's server reads the seed as an unsigned 64-bit integer


@dataclass
class TtsQuery:
    """A session's query, with the names and meanings of Kyutai's rust moshi-server (`TtsStreamingQuery`):
    temperature, top_k (<= 1: greedy, as there), seed, cfg_alpha, max_seq_len (model steps of 80 ms), voice or
    voices (several speakers, at most 5), format. None = the server's default."""

    voices: list[str]  # [] = the server's default voice
    temperature: float
    cfg_coef: float | None
    seed: int | None
    top_k: int = 250
    max_seq_len: int | None = None
    format: str = DEFAULT_FORMAT

    @classmethod
    def parse(cls, query: Mapping[str, str], options: TtsOptions) -> TtsQuery:
        """`query` a dict, or aiohttp's MultiDict (then `voices` may repeat: voices=a&voices=b)."""
        fmt = check_format(query.get("format", DEFAULT_FORMAT))

        def number(name: str, low: float, high: float) -> float | None:
            raw = query.get(name)
            if raw is None:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise ProtocolError(f"query parameter {name}={raw!r} is not a number") from None
            if not math.isfinite(value) or not low <= value <= high:
                raise ProtocolError(f"query parameter {name}={raw!r} is outside [{low:g}, {high:g}]")
            return value

        def integer(name: str, low: int, high: int) -> int | None:
            raw = query.get(name)
            if raw is None:
                return None
            if not raw.strip().isdigit():
                raise ProtocolError(f"query parameter {name}={raw!r} is not a whole number from {low} to {high}")
            value = int(raw)
            if not low <= value <= high:
                raise ProtocolError(f"query parameter {name}={raw!r} is outside [{low}, {high}]")
            return value

        temperature = number("temperature", 0.0, 10.0)
        top_k = integer("top_k", 0, 1_000_000)
        return cls(_voices(query), options.temperature if temperature is None else temperature,
                   number("cfg_alpha", 0.0, 20.0), integer("seed", 0, MAX_SEED),
                   250 if top_k is None else top_k, integer("max_seq_len", 1, 10**9), fmt)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k <= 1


def _voices(query: Mapping[str, str]) -> list[str]:
    """`voice=NAME`, or `voices` given several times or as a JSON list (`voices=["a","b"]`); not both."""
    getall = getattr(query, "getall", None)
    raw = list(getall("voices", [])) if getall is not None else ([query["voices"]] if "voices" in query else [])
    if len(raw) == 1 and raw[0].lstrip().startswith("["):
        try:
            raw = json.loads(raw[0])
        except ValueError:
            raise ProtocolError(f"query parameter voices={raw[0]!r} is not a JSON list of names") from None
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ProtocolError("query parameter voices must list voice names (strings)")
    voice = query.get("voice")
    if voice and raw:
        raise ProtocolError("give either `voice` or `voices`, not both")
    if voice:
        return [voice]
    if len(raw) > MAX_SPEAKERS:
        raise ProtocolError(f"{len(raw)} voices: the model has {MAX_SPEAKERS} speaker slots")
    if any(not v for v in raw):
        raise ProtocolError("query parameter voices holds an empty name")
    return raw
