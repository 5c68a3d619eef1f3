"""The msgpack messages of Kyutai's delayed-streams (DSM) clients: speech-to-text at /api/asr-streaming,
text-to-speech at /api/tts_streaming (as their `stt_*_rust_server.py` and `tts_rust_server.py` scripts speak).

Every message is one binary websocket frame holding a msgpack map with a "type":

    ASR  client -> server  {"type": "Audio", "pcm": [float, ...]}   24 kHz mono float PCM, any length
                           {"type": "OggOpus", "data": bytes}       Ogg-Opus pages of such audio, split anywhere
                           {"type": "Marker", "id": int}            echoed once the audio before it is transcribed
                           {"type": "Init"}                         accepted and ignored (Ready is sent anyway)
    ASR  server -> client  {"type": "Ready"}
                           {"type": "Word", "text": str, "start_time": float}
                           {"type": "EndWord", "stop_time": float}
                           {"type": "Step", "step_idx": int, "prs": [float, ...], "buffered_pcm": int}
                                 (per 80 ms, for models with voice-activity heads)
                           {"type": "Marker", "id": int}
    TTS  client -> server  {"type": "Text", "text": str}   {"type": "Eos"}
                           {"type": "Voice", "embeddings": [float, ...], "shape": [1, dim, frames]}
                                 (before the first Text: this session's voice, as a voice file's speaker_wavs)
    TTS  server -> client  {"type": "Ready"}   {"type": "Audio", "pcm": [float, ...]}   (format=PcmMessagePack;
                                 the other formats in `tts_format`; an OggOpus message's data may be bin or a
                                 list of byte values: `ogg_bytes` reads both)
                           {"type": "Text", "text": str, "start_s": float, "stop_s": float}
    both server -> client  {"type": "Error", "message": str}
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from ..errors import ProtocolError

# What a client may send on each endpoint, and the fields each message needs (name -> type check, description).
_FIELDS = {
    "Audio": {"pcm": "a list of numbers (float PCM at 24 kHz)"},
    "OggOpus": {"data": "bytes (Ogg-Opus pages)"},
    "Init": {},
    "Marker": {"id": "an integer"},
    "Text": {"text": "a string"},
    "Eos": {},
    "Voice": {"embeddings": "a flat list of numbers", "shape": "a list of dimensions, [1, dim, frames]"},
}
ASR_TYPES = ("Audio", "OggOpus", "Marker", "Init")
TTS_TYPES = ("Text", "Eos", "Voice")


def pack(message: dict) -> bytes:
    """One server message (times as 64-bit floats, as Kyutai's server sends them)."""
    return msgpack.packb(message)


def pack_audio(pcm: np.ndarray) -> bytes:
    """{"type": "Audio", "pcm": [...]} with the samples as msgpack 32-bit floats (0xca + big-endian), built
    with numpy rather than a Python float per sample."""
    samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
    body = np.empty((samples.size, 5), dtype=np.uint8)
    body[:, 0] = 0xCA
    body[:, 1:] = samples.astype(">f4").view(np.uint8).reshape(-1, 4)
    n = samples.size
    if n < 16:
        header = bytes([0x90 | n])  # fixarray
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")  # array 16
    else:
        header = b"\xdd" + n.to_bytes(4, "big")  # array 32
    return _AUDIO_PREFIX + header + body.tobytes()


_AUDIO_PREFIX = b"\x82" + msgpack.packb("type") + msgpack.packb("Audio") + msgpack.packb("pcm")  # map of 2


def error(message: str) -> bytes:
    return pack({"type": "Error", "message": message})


def parse(data: bytes | str, accepted: tuple[str, ...], max_bytes: int) -> dict:
    """A client message as a dict with a checked "type" and fields; ProtocolError says what is wrong."""
    if isinstance(data, str):
        raise ProtocolError("this endpoint takes binary msgpack messages, got a text frame")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        # Bounded by the message size already; strings must be valid UTF-8, maps keyed by strings.
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a msgpack map with a \"type\", got a {type(message).__name__}")
    kind = message.get("type")
    if kind not in accepted:
        raise ProtocolError(f"unknown message type {kind!r}: this endpoint accepts {', '.join(accepted)}")
    for name, what in _FIELDS[kind].items():
        if name not in message:
            raise ProtocolError(f"a {kind} message needs \"{name}\" ({what})")
    if kind == "Marker" and (isinstance(message["id"], bool) or not isinstance(message["id"], int)):
        raise ProtocolError(f"a Marker's \"id\" must be an integer, got {message['id']!r}")
    if kind == "Text" and not isinstance(message["text"], str):
        raise ProtocolError(f"a Text message's \"text\" must be a string, got {type(message['text']).__name__}")
    if kind == "Audio":
        message["pcm"] = _pcm(message["pcm"])
    if kind == "OggOpus":
        message["data"] = ogg_bytes(message["data"])
    if kind == "Voice":
        message["embeddings"] = _voice(message["embeddings"], message["shape"])
    return message


def ogg_bytes(data) -> bytes:
    """The `data` of an OggOpus message as bytes: msgpack bin (what openmoshi sends), or an array of byte values
    (what Kyutai's rust server sends: rmp_serde writes its `Vec<u8>` field as an array of integers). For the
    server reading ASR input and for clients reading OggOpusMessagePack output alike."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                                               for b in data):
        return bytes(data)
    raise ProtocolError("an OggOpus message's \"data\" must be bytes (msgpack bin or a list of 0..255)")


def _pcm(values) -> np.ndarray:
    if not isinstance(values, (list, tuple)):
        raise ProtocolError(f"an Audio message's \"pcm\" must be a list of numbers, got {type(values).__name__}")
    try:
        pcm = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise ProtocolError("an Audio message's \"pcm\" must hold numbers only") from None
    if pcm.ndim != 1 or (pcm.size and not math.isfinite(float(np.abs(pcm).max()))):
        raise ProtocolError("an Audio message's \"pcm\" must be a flat list of finite numbers")
    return pcm


def _voice(values, shape) -> np.ndarray:
    """A Voice message's embeddings as a float32 array of its `shape` ([1, dim, frames], as a voice file holds)."""
    if not isinstance(shape, (list, tuple)) or not shape or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ProtocolError(f"a Voice message's \"shape\" must be a list of positive integers, got {shape!r}")
    if len(shape) != 3 or shape[0] != 1:
        raise ProtocolError(f"a Voice message's \"shape\" must be [1, dim, frames] (a voice file's speaker_wavs), "
                            f"got {list(shape)}")
    if not isinstance(values, (list, tuple)):
        raise ProtocolError(f"a Voice message's \"embeddings\" must be a list of numbers, got {type(values).__name__}")
    if len(values) != math.prod(shape):
        raise ProtocolError(f"a Voice message holds {len(values)} numbers, its shape {list(shape)} needs "
                            f"{math.prod(shape)}")
    try:
        emb = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise ProtocolError("a Voice message's \"embeddings\" must hold numbers only") from None
    if emb.ndim != 1 or not np.isfinite(emb).all():
        raise ProtocolError("a Voice message's \"embeddings\" must be a flat list of finite numbers")
    return emb.reshape(shape)
