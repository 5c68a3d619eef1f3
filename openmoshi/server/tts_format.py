"""The output formats of /api/tts_streaming (`?format=`), those of Kyutai's Rust moshi-server:

    PcmMessagePack      msgpack maps: Ready, {"type": "Audio", "pcm": [float]} per 80 ms, Text with word times,
                        Error (the default here)
    OggOpusMessagePack  the same maps, the audio as {"type": "OggOpus", "data": bytes}: Ogg-Opus pages, the
                        stream headers (OpusHead, OpusTags) in the first such message, before any audio
    OggOpus             raw binary frames only: the headers, then the pages of each 80 ms frame
    Pcm                 raw binary frames only: each 80 ms frame as little-endian float32 samples

The raw formats carry audio and nothing else (no Ready, no word times, no Error message): why a session ends
goes in the close frame's reason instead. Kyutai's server defaults to OggOpus; openmoshi keeps PcmMessagePack,
the format every DSM client script asks for.
"""

from __future__ import annotations

import numpy as np

from ..audio.opus import OpusEncoderStream
from ..errors import ProtocolError
from . import dsm_protocol as dsm

FORMATS = ("PcmMessagePack", "OggOpusMessagePack", "OggOpus", "Pcm")
DEFAULT_FORMAT = "PcmMessagePack"


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ProtocolError(f"format={name!r} is not supported: use one of {', '.join(FORMATS)}")
    return name


class TtsEncoder:
    """One session's output in its format: `opening()` first, then `audio` and `word` per step (None = nothing
    to send in this format)."""

    def __init__(self, name: str) -> None:
        self.name = check_format(name)
        self.messages = name.endswith("MessagePack")  # msgpack maps: Ready, Text, Error
        self._opus = OpusEncoderStream() if name.startswith("OggOpus") else None

    def opening(self) -> list[bytes]:
        """What the client gets before any audio: Ready (msgpack formats), then the Ogg-Opus stream headers."""
        out = [dsm.pack({"type": "Ready"})] if self.messages else []
        if self._opus is not None:
            out.append(self._ogg(self._opus.headers()))
        return out

    def audio(self, pcm: np.ndarray) -> bytes | None:
        if self._opus is not None:
            pages = self._opus.push(pcm)
            return self._ogg(pages) if pages else None
        if self.messages:
            return dsm.pack_audio(pcm)
        return np.asarray(pcm, dtype="<f4").tobytes()

    def word(self, text: str, start_s: float, stop_s: float) -> bytes | None:
        if not self.messages:
            return None
        return dsm.pack({"type": "Text", "text": text, "start_s": start_s, "stop_s": stop_s})

    def error(self, message: str) -> bytes | None:
        return dsm.error(message) if self.messages else None

    def _ogg(self, data: bytes) -> bytes:
        return dsm.pack({"type": "OggOpus", "data": data}) if self.messages else data
