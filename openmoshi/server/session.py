"""One conversation on the chat websocket: user audio in (decoded off the event loop, within a budget), Moshi's
audio and text out (through a bounded outbox), closed when idle, too fast, not reading, or at shutdown.

Everything a client controls costs bounded work per byte and runs outside the event loop, so one client's
abuse costs only its own session: the other conversations keep their 80 ms pace.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging

import numpy as np
from aiohttp import WSMsgType, web

from ..audio.opus import DecodeLimitReached, OpusDecoderStream, OpusEncoderStream
from ..errors import ProtocolError
from . import protocol
from .engine import Engine, Slot
from .limits import InputBudget, SessionLimits
from .protocol import Kind
from .ws_session import WsSession

logger = logging.getLogger(__name__)


class Outbox:
    """Moshi's output waiting to be sent: at most `limit` frames; a client that does not read loses the oldest
    audio (the text of a dropped frame is kept and sent with the next one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._items: collections.deque[tuple[np.ndarray | None, str | None]] = collections.deque()
        self._ready = asyncio.Event()
        self.status: bytes | None = None  # the latest stream status message (only the latest matters)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, pcm: np.ndarray | None, text: str | None) -> None:
        # A copy: the engine's pcm is a row of the batch's output array, which must not stay alive here.
        item = (None if pcm is None else np.array(pcm, dtype=np.float32, copy=True), text)
        self._items.append(item)
        while len(self._items) > self.limit:
            _, old_text = self._items.popleft()
            self.dropped += 1
            if old_text:
                pcm0, text0 = self._items[0]
                self._items[0] = (pcm0, old_text + (text0 or ""))
        self._ready.set()

    def put_status(self, message: bytes) -> None:
        self.status = message
        self._ready.set()

    def take_status(self) -> bytes | None:
        message, self.status = self.status, None
        return message

    async def get(self) -> tuple[np.ndarray | None, str | None]:
        """The oldest frame; (None, None) when only a status message is waiting (`take_status`)."""
        while not self._items:
            if self.status is not None:
                return None, None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class ChatSession(WsSession):
    """Runs one accepted conversation (its slot is acquired by the caller and released when `run` returns)."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine: Engine, slot: Slot,
                 outbox: Outbox, limits: SessionLimits, pool: concurrent.futures.Executor) -> None:
        super().__init__(request, ws, limits)
        self.engine = engine
        self.slot = slot
        self.outbox = outbox
        self.pool = pool
        self.sample_rate = engine.bundle.sample_rate
        self.budget = InputBudget(limits.input_rate, limits.input_burst_s)
        self.decoder = OpusDecoderStream(self.sample_rate)

    def error(self, message: str) -> bytes:
        return protocol.error(message)  # kind 5

    # ---- user -> server
    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.limits.idle_timeout_s
        last_audio = loop.time()
        while not self.ws.closed:
            message = await self.receive_until_idle(last_audio)
            if message is None:
                await self.end(f"closed: no audio received for {idle:g} s (idle timeout); reconnect to talk again")
                return
            if message.type == WSMsgType.BINARY:
                try:
                    kind, payload = protocol.parse_client_message(message.data, self.limits.max_message_bytes)
                except ProtocolError as exc:
                    self.decoder = OpusDecoderStream(self.sample_rate)  # as after bad audio: restart cleanly
                    await self._bad_message(exc)
                    continue
                if kind == Kind.AUDIO:
                    if await self._audio(loop, payload):
                        last_audio = loop.time()
                    if self.closed_because:
                        return
            elif message.type == WSMsgType.TEXT:
                await self._bad_message(ProtocolError("this protocol uses binary frames only"))
            elif message.type == WSMsgType.ERROR:
                logger.info("websocket error in slot %d: %s", self.slot.index, self.ws.exception())
                return
            elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return

    async def _audio(self, loop: asyncio.AbstractEventLoop, payload: bytes) -> bool:
        """Decodes one audio message in the worker pool and queues its pcm; True if it held audio."""
        allowed = int(self.budget.available() * self.sample_rate)
        if allowed <= 0:
            await self._too_fast()
            return False
        pcm, error = await loop.run_in_executor(self.pool, self._decode, self.decoder, payload, allowed)
        self.budget.spend(pcm.size / self.sample_rate)
        if pcm.size:
            self.engine.push_audio(self.slot, pcm)
        if isinstance(error, DecodeLimitReached):
            await self._too_fast()
        elif error is not None:
            self.decoder = OpusDecoderStream(self.sample_rate)  # a bad stream restarts cleanly
            await self._bad_message(error)
        return pcm.size > 0

    @staticmethod
    def _decode(decoder: OpusDecoderStream, payload: bytes, allowed: int) -> tuple[np.ndarray, ProtocolError | None]:
        """Runs in the pool: the pcm of one message, and the error that cut it short if any."""
        try:
            decoder.push(payload, sample_limit=allowed)
            return decoder.read(), None
        except ProtocolError as exc:
            return decoder.read(), exc

    async def _too_fast(self) -> None:
        lim = self.limits
        await self.end(f"closed: audio sent faster than real time (more than {lim.input_burst_s:g} s ahead at "
                       f"{lim.input_rate:g} s of audio per second); stream audio at its real pace")

    async def _bad_message(self, exc: ProtocolError) -> None:
        self.engine.metrics.protocol_errors += 1
        await self.ws.send_bytes(protocol.error(f"bad message: {exc}"))

    # ---- server -> user
    async def _send_loop(self) -> None:
        encoder = OpusEncoderStream()
        while True:
            pcm, text = await self.outbox.get()
            messages = []
            status = self.outbox.take_status()
            if status is not None:
                messages.append(status)
            if pcm is not None:
                data = encoder.push(pcm)
                if data:
                    messages.append(protocol.encode(Kind.AUDIO, data))
            if text:
                messages.append(protocol.text_piece(text))
            for message in messages:
                if not await self.send(message):
                    return
