"""What the DSM endpoints (/api/asr-streaming, /api/tts_streaming) share: waiting out the warm-up, a session's
msgpack errors, outbox and step signal, and the run of an accepted session (Ready, run, release, log)."""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from ..errors import ProtocolError
from . import dsm_protocol as dsm
from .limits import SessionLimits
from .ws_session import WsSession, open_websocket

logger = logging.getLogger(__name__)

CLIENT_GONE = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class DsmSession(WsSession):
    """A DSM client: msgpack errors, an outbox the engine's steps fill (on the event loop) and `stepped`, set after
    each step of the session (what a reader held back by backpressure waits for)."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine, limits: SessionLimits) -> None:
        super().__init__(request, ws, limits)
        self.engine = engine
        self.messages = True  # False for a raw output format: no msgpack messages besides the audio
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.stepped = asyncio.Event()

    def error(self, message: str) -> bytes | None:
        return dsm.error(message)

    def opening(self) -> list[bytes]:
        """What the client gets once its session is accepted."""
        return [dsm.pack({"type": "Ready"})]

    async def _wait_while(self, full: tp.Callable[[], bool]) -> bool:
        """Backpressure: waits for steps while `full()`; True if it waited."""
        waited = False
        while full():
            self.stepped.clear()
            await self.stepped.wait()
            waited = True
        return waited

    async def _parse(self, message: WSMessage, accepted: tuple[str, ...]) -> dict | None:
        """The client message (a checked dict), or None: not data, or bad (the client then gets an Error)."""
        if message.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            return None
        try:
            return self._check(dsm.parse(message.data, accepted, self.limits.max_message_bytes))
        except ProtocolError as exc:
            self.engine.metrics.protocol_errors += 1
            data = self.error(f"bad message: {exc}")
            if data is not None:
                await self.ws.send_bytes(data)
            return None

    def _check(self, message: dict) -> dict:
        """A session's own check of a well-formed message (raise ProtocolError to refuse it)."""
        return message



async def refuse(ws: web.WebSocketResponse, message: str, messages: bool = True) -> web.WebSocketResponse:
    """An Error then a close; without `messages` (a raw output format) the close frame says why."""
    if messages:
        await ws.send_bytes(dsm.error(message))
        await ws.close()
    else:
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=message[:120].encode())
    return ws


async def accept(request: web.Request, engine, limits: SessionLimits) -> tuple[web.WebSocketResponse, bool]:
    """The upgraded websocket, and whether the model is ready (a client connecting during warm-up waits for it;
    if it never gets ready the client has had an Error and the socket is closed)."""
    ws = open_websocket(limits)
    await ws.prepare(request)
    return ws, await wait_ready(ws, engine, limits)


async def wait_ready(ws: web.WebSocketResponse, engine, limits: SessionLimits) -> bool:
    """Holds a client connecting during warm-up until the model is ready; False (after an Error) if it never is."""
    if engine.ready.is_set():
        return True
    try:
        await asyncio.wait_for(engine.ready.wait(), limits.warmup_wait_s)
        return True
    except asyncio.TimeoutError:
        await refuse(ws, "the server is still warming up; try again in a moment")
        return False


async def run_session(request: web.Request, ws: web.WebSocketResponse, engine, session: DsmSession, slot,
                      sessions: set, what: str, slot_kind: str) -> web.WebSocketResponse:
    """Ready, then the session until it ends; its slot is released and the end logged whatever happens. A None
    slot (all taken) gets the client a busy Error instead."""
    if slot is None:
        return await refuse(ws, f"server busy: every {slot_kind} slot ({engine.max_sessions}) is taken, "
                                "try again later", session.messages)
    session.slot = slot
    logger.info("%s session in slot %d from %s", what, slot.index, request.remote)
    sessions.add(session)
    try:
        for message in session.opening():
            await ws.send_bytes(message)
        await session.run()
    finally:
        sessions.discard(session)
        engine.release(slot)
        logger.info("%s session in slot %d ended after %d steps%s", what, slot.index, slot.steps,
                    f" ({session.closed_because})" if session.closed_because else "")
    return ws
