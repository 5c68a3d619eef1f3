"""aiohttp application: the chat websocket of Kyutai's clients, our web page, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import platform
from pathlib import Path

import numpy as np
import torch
from aiohttp import WSMsgType, web

from .. import __version__
from ..audio.opus import OpusDecoderStream, OpusEncoderStream
from ..errors import ProtocolError
from . import protocol
from .engine import Engine, Slot
from .protocol import Kind, SessionSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ENGINE_KEY = web.AppKey("engine", Engine)
TOKEN_KEY = web.AppKey("token", str)
TASK_KEY = web.AppKey("engine_task", asyncio.Task)


def create_app(engine: Engine, token: str | None = None, static_dir: Path = STATIC_DIR) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware])
    app[ENGINE_KEY] = engine
    app[TOKEN_KEY] = token or ""
    app.router.add_get("/api/chat", handle_chat)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/", lambda _: web.FileResponse(static_dir / "index.html"))
    app.router.add_static("/", static_dir)
    app.on_startup.append(_start_engine)
    app.on_cleanup.append(_stop_engine)
    return app


async def _start_engine(app: web.Application) -> None:
    app[TASK_KEY] = asyncio.create_task(app[ENGINE_KEY].run())


async def _stop_engine(app: web.Application) -> None:
    app[ENGINE_KEY].stop()
    await app[TASK_KEY]


@web.middleware
async def _auth_middleware(request: web.Request, handler):
    """With --token, every route but /health needs it (query `token=`, `Authorization: Bearer`, or X-Moshi-Token)."""
    expected = request.app[TOKEN_KEY]
    if expected and request.path != "/health":
        given = request.query.get("token") or request.headers.get("X-Moshi-Token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise web.HTTPUnauthorized(text="a valid token is needed: add ?token=... to the URL\n")
    return await handler(request)


async def handle_health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response({"status": "ok", "sessions": engine.active_sessions,
                              "max_sessions": engine.max_sessions, "model": engine.bundle.source})


async def handle_metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    live = sum(s.dropped for s in engine.slots if s is not None)
    return web.Response(text=engine.metrics.prometheus(engine.active_sessions, engine.max_sessions, live),
                        content_type="text/plain", charset="utf-8")


async def handle_chat(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_MESSAGE_BYTES + 1, heartbeat=30)
    await ws.prepare(request)
    try:
        settings = SessionSettings.from_query(dict(request.query), engine.defaults)
    except ProtocolError as exc:
        await ws.send_bytes(protocol.error(str(exc)))
        await ws.close()
        return ws

    outbox: asyncio.Queue = asyncio.Queue()
    slot = engine.acquire(settings, lambda pcm, text: outbox.put_nowait((pcm, text)))
    if slot is None:
        logger.info("refused a session: all %d slots busy", engine.max_sessions)
        await ws.send_bytes(protocol.error(f"server busy: every conversation slot ({engine.max_sessions}) "
                                           "is taken, try again later"))
        await ws.close()
        return ws
    logger.info("session in slot %d from %s", slot.index, request.remote)
    sender = asyncio.create_task(_send_loop(ws, outbox))
    try:
        await ws.send_bytes(protocol.handshake())
        await ws.send_bytes(protocol.metadata(_session_info(engine, slot, settings)))
        await _receive_loop(ws, engine, slot)
    finally:
        engine.release(slot)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        logger.info("session in slot %d ended after %d steps", slot.index, slot.steps)
    return ws


def _build_info() -> dict:
    """Kyutai's web client shows a `build_info` of strings (its Rust server's build details)."""
    info = {key: "" for key in ("build_timestamp", "build_date", "git_branch", "git_timestamp", "git_date",
                                "git_hash", "git_describe", "rustc_host_triple", "rustc_version",
                                "cargo_target_triple")}
    info.update(git_describe=f"openmoshi {__version__}", rustc_host_triple=platform.machine(),
                rustc_version=f"python {platform.python_version()}, torch {torch.__version__}")
    return info


BUILD_INFO = _build_info()


def _session_info(engine: Engine, slot: Slot, settings: SessionSettings) -> dict:
    """Metadata (kind 4): the session's settings, with the fields Kyutai's web client shows as server info."""
    model = Path(engine.bundle.source).name
    return {"slot": slot.index, "max_sessions": engine.max_sessions, "sample_rate": engine.bundle.sample_rate,
            "model": model, "lm_model_file": model, "instance_name": "openmoshi", "build_info": BUILD_INFO,
            **settings.describe()}


async def _receive_loop(ws: web.WebSocketResponse, engine: Engine, slot: Slot) -> None:
    decoder = OpusDecoderStream(engine.bundle.sample_rate)
    async for message in ws:
        if message.type == WSMsgType.BINARY:
            try:
                kind, payload = protocol.parse_client_message(message.data)
                if kind == Kind.AUDIO:
                    pcm = decoder.feed(payload)
                    engine.push_audio(slot, pcm)
            except ProtocolError as exc:
                engine.metrics.protocol_errors += 1
                decoder = OpusDecoderStream(engine.bundle.sample_rate)  # a bad stream restarts cleanly
                await ws.send_bytes(protocol.error(f"bad message: {exc}"))
        elif message.type == WSMsgType.TEXT:
            engine.metrics.protocol_errors += 1
            await ws.send_bytes(protocol.error("bad message: this protocol uses binary frames only"))
        elif message.type == WSMsgType.ERROR:
            logger.info("websocket error in slot %d: %s", slot.index, ws.exception())
            break


async def _send_loop(ws: web.WebSocketResponse, outbox: asyncio.Queue) -> None:
    encoder = OpusEncoderStream()
    while True:
        pcm, text = await outbox.get()
        if pcm is not None:
            data = encoder.push(np.asarray(pcm, dtype=np.float32))
            if data:
                await ws.send_bytes(protocol.encode(Kind.AUDIO, data))
        if text:
            await ws.send_bytes(protocol.text_piece(text))
