"""The websocket protocol of Kyutai's clients: binary frames, byte 0 = kind, the rest = payload."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import ProtocolError

MAX_MESSAGE_BYTES = 64 * 1024  # default limit: a 20 ms Opus page is ~100 bytes; anything near this is abuse


class Kind(enum.IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6
    COLORED_TEXT = 7


def encode(kind: Kind, payload: bytes | str = b"") -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return bytes([int(kind)]) + data


def handshake() -> bytes:
    """Kind 0 with protocol and model versions (two little-endian u32, as Kyutai's Rust server sends)."""
    return encode(Kind.HANDSHAKE, (0).to_bytes(4, "little") + (0).to_bytes(4, "little"))


def metadata(values: dict) -> bytes:
    return encode(Kind.METADATA, json.dumps(values))


def error(message: str) -> bytes:
    return encode(Kind.ERROR, message)


def text_piece(piece: str) -> bytes:
    """A SentencePiece piece as the clients show it: U+2581 (word start) becomes a space."""
    return encode(Kind.TEXT, piece.replace("\u2581", " "))


def parse_client_message(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Kind, bytes]:
    """(kind, payload) of a client message; ProtocolError for anything a client may not send."""
    if not data:
        raise ProtocolError("empty message: expected a kind byte")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind {data[0]}") from None
    if kind not in (Kind.AUDIO, Kind.CONTROL, Kind.PING, Kind.METADATA):
        raise ProtocolError(f"clients may not send {kind.name.lower()} messages")
    return kind, data[1:]


@dataclass
class SessionSettings:
    """Sampling settings of one conversation, from the query string of the web client."""

    text_temperature: float
    text_topk: int
    audio_temperature: float
    audio_topk: int
    text_seed: int | None = None
    audio_seed: int | None = None
    pad_mult: float = 0.0
    repetition_penalty: float = 1.0
    repetition_penalty_context: int = 64
    ignored: list[str] = field(default_factory=list)

    # query parameter -> (type, lowest, highest)
    FIELDS: ClassVar[dict[str, tuple[type, float, float]]] = {"text_temperature": (float, 0.0, 10.0), "audio_temperature": (float, 0.0, 10.0),
              "text_topk": (int, 0, 1_000_000), "audio_topk": (int, 0, 1_000_000),
              "pad_mult": (float, -100.0, 100.0), "repetition_penalty": (float, 0.1, 10.0),
              "repetition_penalty_context": (int, 0, 10_000), "text_seed": (int, -1, 2 ** 63 - 1),
              "audio_seed": (int, -1, 2 ** 63 - 1)}

    @classmethod
    def from_query(cls, query: dict[str, str], defaults: SessionSettings) -> SessionSettings:
        values = {name: getattr(defaults, name) for name in cls.FIELDS}
        for name, (kind, low, high) in cls.FIELDS.items():
            if name not in query:
                continue
            raw = query[name]
            try:
                number = float(raw)
                # Integers written as such are read exactly (seeds can exceed float precision).
                value = int(raw) if kind is int and raw.strip().lstrip("-").isdigit() else kind(number)
            except (ValueError, OverflowError):
                raise ProtocolError(f"query parameter {name}={raw!r} is not a number") from None
            if not low <= value <= high or math.isnan(number):
                raise ProtocolError(f"query parameter {name}={raw!r} is outside [{low}, {high}]")
            values[name] = value
        for seed in ("text_seed", "audio_seed"):
            if values[seed] is not None and values[seed] < 0:
                values[seed] = None  # -1 = pick one at random
        settings = cls(**values)
        if settings.pad_mult != 0.0:
            settings.ignored.append("pad_mult")
        if settings.repetition_penalty != 1.0:
            settings.ignored.append("repetition_penalty")
        return settings

    def describe(self) -> dict:
        return {"text_temperature": self.text_temperature, "text_topk": self.text_topk,
                "audio_temperature": self.audio_temperature, "audio_topk": self.audio_topk,
                "text_seed": self.text_seed, "audio_seed": self.audio_seed, "pad_mult": self.pad_mult,
                "repetition_penalty": self.repetition_penalty,
                "repetition_penalty_context": self.repetition_penalty_context,
                "not_applied": list(self.ignored)}
