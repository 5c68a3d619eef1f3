"""Streaming text-to-speech at /api/tts_streaming (the msgpack protocol of Kyutai's DSM clients, see
`dsm_protocol`): words in as they come, 80 ms audio frames out with word timings, then a normal close.

Sessions share the batched step of `TtsEngine` (one slot each, up to `max_sessions`). Query parameters, as
Kyutai's rust moshi-server names them (`tts_request.TtsQuery`): voice (a file of --voice-dir) or voices (one per
speaker), format (`tts_format`: PcmMessagePack, OggOpusMessagePack, OggOpus, Pcm), temperature, top_k, seed,
cfg_alpha, max_seq_len; auth_id for the token. A bad value gets an Error and the socket closes. A Voice
message before the first Text replaces the query's voice with the embeddings it carries (as Kyutai's server).
"""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, web

from ..errors import ProtocolError
from . import dsm_protocol as dsm
from .dsm_session import CLIENT_GONE, DsmSession, accept, refuse, run_session
from .limits import SessionLimits
from .tts_engine import Ended, TtsEngine, TtsOutput, TtsSlot
from .tts_format import TtsEncoder
from .tts_request import TtsOptions, TtsQuery

__all__ = ["TtsEngine", "TtsOptions", "handle_tts"]

MAX_PENDING_WORDS = 2000  # words queued ahead of the speech before the server stops reading (backpressure)
_DONE = object()


class TtsSession(DsmSession):
    """One client: its text goes to its slot as it arrives, its audio and words come back as they are made."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine: TtsEngine,
                 limits: SessionLimits, encoder: TtsEncoder, cfg_coef: float | None = None) -> None:
        super().__init__(request, ws, engine, limits)
        self.encoder = encoder
        self.cfg_coef = cfg_coef  # the query's, for the conditions of a Voice message
        self.texted = False
        # with messages, the Error before the close says why; a raw format has only the close frame for it
        self.messages = encoder.messages
        self.reason_in_close_frame = not encoder.messages
        self.slot: TtsSlot | None = None
        self.eos = False
        self.last_input = 0.0

    def on_output(self, output: TtsOutput) -> None:
        """Called on the event loop after each step of this session."""
        pcm, words, ended = output
        encoded = [self.encoder.audio(pcm)] if pcm.size else []
        encoded += [self.encoder.word(text, start, stop) for text, start, stop in words]
        for message in encoded:
            if message is not None:
                self.outbox.put_nowait(message)
        if ended is not None:
            self.outbox.put_nowait((_DONE, ended))
        self.stepped.set()

    def error(self, message: str) -> bytes | None:
        return self.encoder.error(message)

    def opening(self) -> list[bytes]:
        return self.encoder.opening()

    async def run(self) -> None:
        """Reads text while sending what the steps make; closes normally once all is said (or max_seq_len is
        reached: the close frame says so), else says why."""
        self.last_input = asyncio.get_running_loop().time()
        ended = await self._beside(self._send_loop(), self._receive_loop())
        if ended is None:  # the client has gone
            return
        if ended.error:
            await self.end(ended.reason or None, WSCloseCode.OK if not ended.reason else WSCloseCode.POLICY_VIOLATION)
        else:
            await self.end(ended.reason, WSCloseCode.OK, tell=False)

    def _check(self, message: dict) -> dict:
        if self.eos:
            raise ProtocolError(f"a {message['type']} message after Eos: the text has ended")
        if message["type"] == "Voice":
            if self.texted:
                raise ProtocolError("a Voice message after Text: send the voice before the first word")
            voice = self.engine.voice_message(message["embeddings"])
            message["conditions"] = self.engine.conditions(voice, self.cfg_coef)
        return message

    async def _receive_loop(self) -> None:
        slot = self.slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        while not self.ws.closed:
            await self._wait_while(lambda: len(slot.texts) + slot.pending_words > MAX_PENDING_WORDS)
            message = await self.ws.receive()
            if message.type in CLIENT_GONE:
                self.outbox.put_nowait((_DONE, None))
                return
            msg = await self._parse(message, dsm.TTS_TYPES)
            if msg is None:
                continue
            self.last_input = loop.time()
            if msg["type"] == "Text":
                self.texted = True
                self.engine.push_text(slot, msg["text"])
            elif msg["type"] == "Voice":
                self.engine.push_conditions(slot, msg["conditions"])
            else:
                self.eos = True
                self.engine.push_eos(slot)

    async def _send_loop(self) -> Ended | None:
        """Sends until the speech ends: why (`Ended`), or None when the client left."""
        idle = self.limits.idle_timeout_s
        while True:
            remaining = self.idle_left(self.last_input)
            if remaining <= 0 and self.outbox.empty():
                return Ended(f"closed: no text received for {idle:g} s (idle timeout); send Eos at the end of the "
                             "text")
            try:
                item = await asyncio.wait_for(self.outbox.get(), max(remaining, 0.01))
            except asyncio.TimeoutError:
                continue
            if isinstance(item, tuple):
                return item[1]
            if not await self.send(item):
                return None


async def handle_tts(request: web.Request, engine: TtsEngine, limits: SessionLimits,
                     sessions: set) -> web.StreamResponse:
    ws, ready = await accept(request, engine, limits)
    if not ready:
        return ws
    try:
        query = TtsQuery.parse(request.query, engine.options)
    except ProtocolError as exc:
        return await refuse(ws, str(exc))
    encoder = TtsEncoder(query.format)
    try:
        limit = engine.synth.max_steps
        if query.max_seq_len is not None and query.max_seq_len > limit:
            raise ProtocolError(f"max_seq_len={query.max_seq_len} is over this server's limit of {limit} steps "
                                f"({engine.options.max_seconds:g} s, --max-speech-seconds)")
        conditions = engine.conditions(engine.voices(query.voices), query.cfg_coef)
    except ProtocolError as exc:
        return await refuse(ws, str(exc), encoder.messages)
    session = TtsSession(request, ws, engine, limits, encoder, query.cfg_coef)
    slot = engine.acquire(conditions, 0.0 if query.greedy else query.temperature, query.seed, session.on_output,
                          query.top_k, query.max_seq_len)
    return await run_session(request, ws, engine, session, slot, sessions, "tts", "speech")
