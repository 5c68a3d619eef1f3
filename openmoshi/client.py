"""A websocket client of the chat protocol: streams user audio at real-time pace, collects Moshi's answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import typing as tp
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import numpy as np

from .audio.opus import OpusDecoderStream, OpusEncoderStream
from .errors import OpenMoshiError
from .server.protocol import Kind

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
CHUNK = 1920  # 80 ms per message
QUIET_END_S = 3.0  # after the input ended, this long without audio from the server ends the conversation


@dataclass
class Conversation:
    """What the client heard: Moshi's audio, its text pieces (with arrival times) and the server's messages."""

    audio: list[np.ndarray] = field(default_factory=list)
    pieces: list[tuple[float, str]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    handshake: bytes = b""
    audio_messages: int = 0

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)

    @property
    def text(self) -> str:
        return "".join(piece for _, piece in self.pieces)


class ServerBusy(OpenMoshiError):
    """The server refused the conversation because all its slots are taken."""


FAST_AHEAD_S = 5.0  # realtime=False: audio sent at once, then ...
FAST_PACE = 1.5  # ... this many times real time: servers close clients far ahead of real time


async def _file_chunks(audio: np.ndarray, realtime: bool) -> tp.AsyncIterator[np.ndarray]:
    t0 = time.monotonic()
    for i, offset in enumerate(range(0, len(audio), CHUNK)):
        yield audio[offset:offset + CHUNK]
        seconds = (i + 1) * CHUNK / SAMPLE_RATE
        due = seconds if realtime else max(0.0, seconds - FAST_AHEAD_S) / FAST_PACE
        delay = t0 + due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def converse(url: str, pcm: np.ndarray | tp.AsyncIterator[np.ndarray], realtime: bool = True,
                   tail_s: float = 0.5, params: dict | None = None, on_piece=None,
                   on_audio: tp.Callable[[np.ndarray], None] | None = None,
                   timeout_s: float = 30.0,
                   on_send: tp.Callable[[np.ndarray], None] | None = None) -> Conversation:
    """Stream user audio (float32 mono 24 kHz) to a chat server and return what came back.

    `pcm` is a whole recording (sent in 80 ms chunks at real-time pace, or faster with realtime=False:
    5 s at once, then 1.5 times real time, within the server's input budget, then `tail_s` of silence so the answer can finish) or an async iterator of live chunks
    (e.g. a microphone), sent as they come until it ends. Waits for the handshake before sending, as
    Kyutai's web client does. `on_piece` / `on_audio` see text pieces and decoded audio as they arrive,
    `on_send` each chunk of user audio as it is sent (benchmarks time the answers with it).
    """
    conv = Conversation()
    if params:
        sep = "&" if "?" in url else "?"
        url = url + sep + urlencode(params)  # encoded: a token may hold '&', '#', '+', ...
    encoder = OpusEncoderStream()
    decoder = OpusDecoderStream(SAMPLE_RATE)
    if isinstance(pcm, np.ndarray):
        tail = np.zeros(int(tail_s * SAMPLE_RATE), dtype=np.float32)
        audio = np.concatenate([pcm.astype(np.float32), tail])
        source = _file_chunks(audio, realtime)
        expected = len(audio) - 3 * CHUNK
    else:
        source, expected = pcm, 0
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except aiohttp.ClientError as exc:
            raise OpenMoshiError(f"cannot connect to {url}: {exc}") from exc
        async with ws:
            ready = asyncio.Event()
            done = asyncio.Event()

            async def receive() -> None:
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                        continue
                    kind, payload = message.data[0], message.data[1:]
                    if kind == Kind.HANDSHAKE:
                        conv.handshake = payload
                        ready.set()
                    elif kind == Kind.AUDIO:
                        conv.audio_messages += 1
                        out = decoder.feed(payload)
                        if out.size:
                            conv.audio.append(out)
                            if on_audio is not None:
                                on_audio(out)
                    elif kind == Kind.TEXT:
                        piece = payload.decode("utf-8", errors="replace")
                        conv.pieces.append((time.monotonic() - start, piece))
                        if on_piece is not None:
                            on_piece(piece)
                    elif kind == Kind.METADATA:
                        conv.metadata = json.loads(payload.decode("utf-8"))
                    elif kind == Kind.ERROR:
                        conv.errors.append(payload.decode("utf-8", errors="replace"))
                        ready.set()
                done.set()

            receiver = asyncio.create_task(receive())
            try:
                await asyncio.wait_for(ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise OpenMoshiError(f"no handshake from {url} within {timeout_s:.0f} s") from None
            if conv.errors and not conv.handshake:
                receiver.cancel()
                message = conv.errors[0]
                raise (ServerBusy if "busy" in message else OpenMoshiError)(f"server refused: {message}")
            async for chunk in source:
                if on_send is not None:
                    on_send(chunk)
                data = encoder.push(chunk)
                if data:
                    await ws.send_bytes(bytes([Kind.AUDIO]) + data)
                if done.is_set():
                    break
            # Wait until the answer to the last frame arrived: it trails the input by the model's delay. A
            # server that fell behind dropped some input (its metadata says how much): what it will still send
            # comes within a few steps, so a long silence after the input ended means nothing more is coming.
            deadline = time.monotonic() + timeout_s
            received, last_change = 0, time.monotonic()
            while time.monotonic() < deadline and not done.is_set():
                now_received = sum(len(a) for a in conv.audio)
                missed = conv.metadata.get("stream", {}).get("missed_audio_s", 0.0)
                if now_received >= expected - int(missed * SAMPLE_RATE):
                    break
                if now_received != received:
                    received, last_change = now_received, time.monotonic()
                elif time.monotonic() - last_change > QUIET_END_S:
                    break
                await asyncio.sleep(0.02)
            await ws.close()
            await asyncio.gather(receiver, return_exceptions=True)
    if conv.errors:
        logger.info("server errors: %s", conv.errors)
    return conv

