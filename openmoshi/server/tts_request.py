"""What a /api/tts_streaming client asks for: its query (voice, format, sampling) and the voice file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProtocolError
from .tts_format import DEFAULT_FORMAT, check_format


@dataclass
class TtsOptions:
    """Server-side TTS defaults; a session may change temperature, seed and guidance in its query."""

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


@dataclass
class TtsQuery:
    voice: str | None
    temperature: float
    cfg_coef: float
    seed: int | None
    format: str = DEFAULT_FORMAT

    @classmethod
    def parse(cls, query: dict[str, str], options: TtsOptions) -> TtsQuery:
        fmt = check_format(query.get("format", DEFAULT_FORMAT))

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = query.get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ProtocolError(f"query parameter {name}={raw!r} is not a number") from None
            if not math.isfinite(value) or not low <= value <= high:
                raise ProtocolError(f"query parameter {name}={raw!r} is outside [{low:g}, {high:g}]")
            return value

        seed = query.get("seed")
        if seed is not None and not seed.strip().lstrip("-").isdigit():
            raise ProtocolError(f"query parameter seed={seed!r} is not an integer")
        return cls(query.get("voice") or None, number("temperature", options.temperature, 0.0, 10.0),
                   number("cfg_alpha", options.cfg_coef, 0.0, 20.0), int(seed) if seed is not None else None, fmt)
