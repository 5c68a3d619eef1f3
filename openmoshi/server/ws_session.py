"""What every websocket session of the server shares (chat, ASR, TTS): its two loops run side by side, sends that
give up on a client who stops reading, and an end that says why and never waits long on the client."""

from __future__ import annotations

import asyncio
import logging
import typing as tp

from aiohttp import WSCloseCode, WSMessage, web

from .limits import SessionLimits

logger = logging.getLogger(__name__)


def open_websocket(limits: SessionLimits) -> web.WebSocketResponse:
    """A server websocket bounded by the session limits (message size, send buffer, close wait)."""
    return web.WebSocketResponse(max_msg_size=limits.max_message_bytes + 1, heartbeat=30,
                                 timeout=limits.close_timeout_s, writer_limit=limits.send_buffer_bytes)


class WsSession:
    """A session's lifecycle; subclasses give `error` (their protocol's error message), `_receive_loop` and
    `_send_loop`, and own `slot` (whose index the log names)."""

    reason_in_close_frame = True  # the close frame also carries the reason (cut to 120 characters)

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, limits: SessionLimits) -> None:
        self.request, self.ws, self.limits = request, ws, limits
        self.slot: tp.Any = None
        self.closed_because: str | None = None
        self.last_output = 0.0  # loop time of the last message sent: output still going out is not idleness

    def error(self, message: str) -> bytes | None:
        """The protocol's error message (None: the protocol has none, the close frame's reason says it)."""
        raise NotImplementedError

    async def run(self) -> None:
        """Reads the client while the output is sent beside it, until the client side ends."""
        await self._beside(self._receive_loop(), self._send_loop())

    async def _receive_loop(self) -> None:
        raise NotImplementedError

    async def _send_loop(self) -> tp.Any:
        raise NotImplementedError

    def idle_left(self, last_input: float) -> float:
        """Seconds until the idle timeout: nothing received since `last_input`, nothing sent since last_output."""
        return max(last_input, self.last_output) + self.limits.idle_timeout_s - asyncio.get_running_loop().time()

    async def receive_until_idle(self, last_input: float) -> WSMessage | None:
        """The client's next message, or None once the idle timeout passes first."""
        while True:
            remaining = self.idle_left(last_input)
            if remaining <= 0:
                return None
            try:
                return await self.ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                continue

    @staticmethod
    async def _beside(main: tp.Awaitable, side: tp.Coroutine) -> tp.Any:
        """`main`'s result, with `side` running as a task until main ends (then cancelled and awaited)."""
        task = asyncio.create_task(side)
        try:
            return await main
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def send(self, message: bytes) -> bool:
        """Sends one message; False if the client has gone, or read nothing for `send_stall_s` (then the
        connection is aborted: its buffers would otherwise hold the session's output)."""
        try:
            await asyncio.wait_for(self.ws.send_bytes(message), self.limits.send_stall_s)
        except asyncio.TimeoutError:
            self.closed_because = f"the client read nothing for {self.limits.send_stall_s:g} s"
            logger.info("disconnecting slot %d: %s", self.slot.index, self.closed_because)
            self.abort()
            return False
        except (ConnectionError, RuntimeError):
            return False
        self.last_output = asyncio.get_running_loop().time()
        return True

    async def end(self, message: str | None, code: int = WSCloseCode.POLICY_VIOLATION, tell: bool = True) -> None:
        """Tells the client why (an error message, unless `tell` is False: then only the close frame's reason)
        when `message`, then sends a close frame; never waits long."""
        if message and self.closed_because is None:
            self.closed_because = message
        if self.ws.closed:
            return
        if message:
            logger.info("closing the session in slot %d: %s", self.slot.index, message)
        reason = message[:120].encode() if message and (self.reason_in_close_frame or not tell) else b""
        data = self.error(message) if message and tell else None
        try:
            if data is not None:
                await asyncio.wait_for(self.ws.send_bytes(data), self.limits.close_timeout_s)
            await asyncio.wait_for(self.ws.close(code=code, message=reason), self.limits.close_timeout_s + 0.5)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            self.abort()

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()
