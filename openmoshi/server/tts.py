"""Streaming text-to-speech at /api/tts_streaming (the msgpack protocol of Kyutai's DSM clients, see
`dsm_protocol`): words in as they come, 80 ms audio frames out with word timings, then a normal close.

Sessions share the batched step of `TtsEngine` (one slot each, up to `max_sessions`). Query parameters: voice
(a file of --voice-dir), format (PcmMessagePack), temperature, seed, cfg_alpha; auth_id for the token.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import ProtocolError
from . import dsm_protocol as dsm
from .asr import run_session, wait_ready
from .limits import SessionLimits
from .tts_engine import TtsEngine, TtsOutput, TtsSlot
from .tts_request import TtsOptions, TtsQuery

__all__ = ["TtsEngine", "TtsOptions", "handle_tts"]

logger = logging.getLogger(__name__)

MAX_PENDING_WORDS = 2000  # words queued ahead of the speech before the server stops reading (backpressure)
_DONE = object()


class TtsSession:
    """One client: its text goes to its slot as it arrives, its audio and words come back as they are made."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine: TtsEngine,
                 limits: SessionLimits) -> None:
        self.request, self.ws, self.engine, self.limits = request, ws, engine, limits
        self.slot: TtsSlot | None = None
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.stepped = asyncio.Event()
        self.eos = False
        self.closed_because: str | None = None
        self.last_input = 0.0

    def on_output(self, output: TtsOutput) -> None:
        """Called on the event loop after each step of this session."""
        pcm, words, ended = output
        if pcm.size:
            self.outbox.put_nowait(dsm.pack_audio(pcm))
        for text, start, stop in words:
            self.outbox.put_nowait(dsm.pack({"type": "Text", "text": text, "start_s": start, "stop_s": stop}))
        if ended is not None:
            self.outbox.put_nowait((_DONE, ended))
        self.stepped.set()

    async def run(self) -> None:
        """Reads text while sending what the steps make; closes normally once all is said, else says why."""
        self.last_input = asyncio.get_running_loop().time()
        reader = asyncio.create_task(self._receive_loop())
        try:
            problem = await self._send_loop()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if problem != "gone":
            await self.end(problem or None, WSCloseCode.OK if not problem else WSCloseCode.POLICY_VIOLATION)

    async def end(self, message: str | None, code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        """An Error first when `message`, then a close frame; never waits long on the client."""
        if message and self.closed_because is None:
            self.closed_because = message
        if self.ws.closed:
            return
        try:
            if message:
                await asyncio.wait_for(self.ws.send_bytes(dsm.error(message)), self.limits.close_timeout_s)
            await asyncio.wait_for(self.ws.close(code=code), self.limits.close_timeout_s + 0.5)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            if self.request.transport is not None:
                self.request.transport.abort()

    async def _receive_loop(self) -> None:
        slot = self.slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        while not self.ws.closed:
            while len(slot.texts) + slot.pending_words > MAX_PENDING_WORDS:  # backpressure
                self.stepped.clear()
                await self.stepped.wait()
            message = await self.ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                self.outbox.put_nowait((_DONE, "gone"))
                return
            if message.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                continue
            try:
                msg = dsm.parse(message.data, dsm.TTS_TYPES, self.limits.max_message_bytes)
                if self.eos:
                    raise ProtocolError(f"a {msg['type']} message after Eos: the text has ended")
            except ProtocolError as exc:
                self.engine.metrics.protocol_errors += 1
                await self.ws.send_bytes(dsm.error(f"bad message: {exc}"))
                continue
            self.last_input = loop.time()
            if msg["type"] == "Text":
                self.engine.push_text(slot, msg["text"])
            else:
                self.eos = True
                self.engine.push_eos(slot)

    async def _send_loop(self) -> str:
        """Sends until the speech ends: "" when all is said, "gone" when the client left, else why it stopped."""
        loop = asyncio.get_running_loop()
        idle = self.limits.idle_timeout_s
        last_output = loop.time()
        while True:
            remaining = max(self.last_input, last_output) + idle - loop.time()
            if remaining <= 0 and self.outbox.empty():
                return f"closed: no text received for {idle:g} s (idle timeout); send Eos at the end of the text"
            try:
                item = await asyncio.wait_for(self.outbox.get(), max(remaining, 0.01))
            except asyncio.TimeoutError:
                continue
            if isinstance(item, tuple):
                return item[1]
            try:
                await asyncio.wait_for(self.ws.send_bytes(item), self.limits.send_stall_s)
                last_output = loop.time()
            except asyncio.TimeoutError:
                self.closed_because = f"the client read nothing for {self.limits.send_stall_s:g} s"
                if self.request.transport is not None:
                    self.request.transport.abort()
                return "gone"
            except (ConnectionError, RuntimeError):
                return "gone"


async def handle_tts(request: web.Request, engine: TtsEngine, limits: SessionLimits,
                     sessions: set) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=limits.max_message_bytes + 1, heartbeat=30,
                               timeout=limits.close_timeout_s, writer_limit=limits.send_buffer_bytes)
    await ws.prepare(request)
    if not await wait_ready(ws, engine, limits):
        return ws
    try:
        query = TtsQuery.parse(dict(request.query), engine.options)
        conditions = engine.conditions(engine.voice(query.voice), query.cfg_coef)
    except ProtocolError as exc:
        await ws.send_bytes(dsm.error(str(exc)))
        await ws.close()
        return ws
    session = TtsSession(request, ws, engine, limits)
    slot = engine.acquire(conditions, query.temperature, query.seed, session.on_output)
    if slot is None:
        await ws.send_bytes(dsm.error(f"server busy: every speech slot ({engine.max_sessions}) is taken, "
                                      "try again later"))
        await ws.close()
        return ws
    session.slot = slot
    return await run_session(request, ws, engine, session, sessions, "tts")
