"""aiohttp application: the chat websocket of Kyutai's clients (moshi models), or the streaming ASR / TTS
websockets of Kyutai's DSM clients (stt / tts models, and Moshi-style models whose delays make them ASR or TTS),
our web page, health and metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import platform
from pathlib import Path

import torch
from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractAccessLogger

from .. import __version__
from ..errors import ProtocolError
from . import protocol
from .engine import Engine, Slot
from .limits import SessionLimits
from .metrics import Gauge
from .protocol import SessionSettings
from .session import ChatSession, Outbox

ASR_PATH = "/api/asr-streaming"
TTS_PATH = "/api/tts_streaming"
# What each family serves instead of /api/chat (a conversation needs a moshi or hibiki model).
DSM_ROUTES = {"stt": ("speech-to-text", ASR_PATH), "tts": ("text-to-speech", TTS_PATH)}


def served_as(config) -> str:
    """What a model serves: "stt" or "tts" (the DSM websockets), else its family (/api/chat). A Moshi-style
    model whose delays put the text late is served as "stt", the audio late as "tts" (paper §5.7)."""
    from ..lm.families import DelayedMode
    mode = DelayedMode.from_config(config)
    if mode is not None and mode.kind is not None:
        return {"asr": "stt", "tts": "tts"}[mode.kind]
    return config.model_type

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "openmoshi_token"
ENGINE_KEY = web.AppKey("engine", Engine)
TOKEN_KEY = web.AppKey("token", str)
LIMITS_KEY = web.AppKey("limits", SessionLimits)
TASK_KEY = web.AppKey("engine_task", asyncio.Task)
POOL_KEY = web.AppKey("decode_pool", concurrent.futures.ThreadPoolExecutor)
SESSIONS_KEY = web.AppKey("sessions", set)
# A load balancer that can retry another backend (nginx: proxy_next_upstream http_503) sends this header: a full
# or warming server then answers the websocket upgrade with HTTP 503 instead of accepting it and refusing inside.
RETRY_HEADER = "X-Moshi-Retry-Elsewhere"


def engine_for(bundle, max_sessions: int, max_backlog_frames: int = 12, standing_queue_s: float | None = None,
               tts_options=None):
    """The engine of a model's family: batched chat (moshi, hibiki), batched ASR (stt), TTS sessions (tts); a
    Moshi-style ASR / TTS model (`served_as`) gets the ASR / TTS engine."""
    family = served_as(bundle.config)
    if family == "stt":
        if bundle.config.model_type != "stt":
            from .asr_delayed import DelayedAsrEngine
            return DelayedAsrEngine(bundle, max_sessions)
        from .asr import AsrEngine
        return AsrEngine(bundle, max_sessions)
    if family == "tts":
        from .tts import TtsEngine
        return TtsEngine(bundle, max_sessions, tts_options)
    gen = bundle.generation
    defaults = SessionSettings(text_temperature=gen["temp_text"], text_topk=gen["top_k_text"],
                               audio_temperature=gen["temp"], audio_topk=gen["top_k"])
    return Engine(bundle, max_sessions, defaults, max_backlog_frames=max_backlog_frames,
                  standing_queue_s=standing_queue_s)


def create_app(engine: Engine, token: str | None = None, static_dir: Path = STATIC_DIR,
               limits: SessionLimits | None = None) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware])
    app[ENGINE_KEY] = engine
    app[TOKEN_KEY] = token or ""
    app[LIMITS_KEY] = limits or SessionLimits()
    app[SESSIONS_KEY] = set()
    # User audio is decoded here, one message at a time per session: a session never waits for another's.
    app[POOL_KEY] = concurrent.futures.ThreadPoolExecutor(max_workers=engine.max_sessions,
                                                          thread_name_prefix="moshi-decode")
    app.router.add_get("/api/chat", handle_chat)
    family = served_as(engine.bundle.config)
    if family == "stt":
        app.router.add_get(ASR_PATH, _handle_asr)
    elif family == "tts":
        app.router.add_get(TTS_PATH, _handle_tts)
    app.router.add_get("/api/defaults", handle_defaults)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/", lambda _: web.FileResponse(static_dir / "index.html"))
    app.router.add_static("/", static_dir)
    app.on_startup.append(_start_engine)
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_stop_engine)
    return app


async def handle_defaults(request: web.Request) -> web.Response:
    """The served model's sampling defaults (its config.json's lm_gen_config), named as the chat query parameters:
    the page starts its settings from them instead of Kyutai's client constants."""
    defaults = getattr(request.app[ENGINE_KEY], "defaults", None)
    if defaults is None:
        return web.json_response({})
    return web.json_response({name: getattr(defaults, name) for name in SessionSettings.FIELDS
                              if not name.endswith("_seed")})


async def _start_engine(app: web.Application) -> None:
    app[TASK_KEY] = asyncio.create_task(app[ENGINE_KEY].run())


async def _close_sessions(app: web.Application) -> None:
    """At shutdown every open conversation hears why (kind 5) and gets a close frame, all at once."""
    sessions = list(app[SESSIONS_KEY])
    if sessions:
        logger.info("shutting down: closing %d session(s)", len(sessions))
    await asyncio.gather(*(s.end("server shutting down", code=WSCloseCode.GOING_AWAY) for s in sessions),
                         return_exceptions=True)


async def _stop_engine(app: web.Application) -> None:
    app[ENGINE_KEY].stop()
    await app[TASK_KEY]
    app[POOL_KEY].shutdown(wait=False, cancel_futures=True)


@web.middleware
async def _auth_middleware(request: web.Request, handler):
    """With --token, every route but /health needs it: query `token=` (or `auth_id=`), `Authorization: Bearer`,
    X-Moshi-Token, kyutai-api-key (Kyutai's DSM clients), or the cookie set when the page was opened with
    `?token=` (so its style sheet, scripts, workers and websocket are allowed too)."""
    expected = request.app[TOKEN_KEY]
    if not expected or request.path == "/health":
        return await handler(request)
    from_query = request.query.get("token") or request.query.get("auth_id")
    given = from_query or request.headers.get("X-Moshi-Token") or request.headers.get("kyutai-api-key") \
        or request.cookies.get(TOKEN_COOKIE, "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[len("Bearer "):]
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise web.HTTPUnauthorized(text="a valid token is needed: add ?token=... to the URL\n")
    response = await handler(request)
    if from_query and isinstance(response, web.StreamResponse) and not response.prepared:
        response.set_cookie(TOKEN_COOKIE, expected, httponly=True, samesite="Strict", path="/")
    return response


class AccessLogger(AbstractAccessLogger):
    """One line per request without its query string: tokens and settings never reach the logs."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %.3fs', request.remote, request.method, request.path, response.status,
                         time)


async def handle_health(request: web.Request) -> web.Response:
    """"ok" (200) once warmed up; "warming" with 503 before, so load balancers and probes wait for it."""
    engine = request.app[ENGINE_KEY]
    ready = engine.ready.is_set()
    return web.json_response({"status": "ok" if ready else "warming", "sessions": engine.active_sessions,
                              "max_sessions": engine.max_sessions}, status=200 if ready else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    live = sum(s.dropped for s in engine.slots if s is not None)
    text = engine.metrics.prometheus(engine.active_sessions, engine.max_sessions, live, _gauges(engine))
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _gauges(engine: Engine) -> list[Gauge]:
    """What to alert on: real-time factor above 1, sessions behind, missed audio growing, a queue that fills."""
    slots = [s for s in engine.slots if s is not None]
    frame_s = engine.frame_s

    def per_session(value) -> list[tuple[dict[str, str], float]]:
        return [({"slot": str(s.index)}, value(s)) for s in slots]

    return [
        Gauge("ready", "1 once warmed up and accepting conversations, 0 while warming up.",
              [({}, float(engine.ready.is_set()))]),
        Gauge("torch_threads", "Torch intra-op threads of the model step.", [({}, engine.torch_threads)]),
        Gauge("real_time_factor", "Mean step time of the last 50 steps over the 80 ms frame (> 1: behind).",
              [({}, round(engine.metrics.real_time_factor(frame_s), 4))]),
        Gauge("queue_frames", "User frames (80 ms) waiting for a step, over all sessions.",
              [({}, engine.queued_frames)]),
        Gauge("sessions_behind", "Sessions dropping input because steps are late.",
              [({}, sum(s.behind for s in slots))]),
        Gauge("session_missed_audio_seconds", "User audio dropped in this session because it fell behind.",
              per_session(lambda s: round(s.dropped * frame_s, 3))),
        Gauge("session_latency_seconds", "From a user frame's arrival to Moshi's answer to it (last frame).",
              per_session(lambda s: round(s.latency_s, 4))),
        Gauge("session_queue_frames", "User frames of this session waiting for a step.",
              per_session(lambda s: len(s.frames))),
    ]


def _sent_elsewhere(request: web.Request) -> web.Response | None:
    """The 503 answer to a balancer's retry header when this backend is full or warming (any endpoint)."""
    if request.headers.get(RETRY_HEADER) == "1":
        return _refusal_before_upgrade(request.app[ENGINE_KEY])
    return None


async def _handle_asr(request: web.Request) -> web.StreamResponse:
    from .asr import handle_asr
    if (refusal := _sent_elsewhere(request)) is not None:
        return refusal
    return await handle_asr(request, request.app[ENGINE_KEY], request.app[LIMITS_KEY], request.app[SESSIONS_KEY])


async def _handle_tts(request: web.Request) -> web.StreamResponse:
    from .tts import handle_tts
    if (refusal := _sent_elsewhere(request)) is not None:
        return refusal
    return await handle_tts(request, request.app[ENGINE_KEY], request.app[LIMITS_KEY], request.app[SESSIONS_KEY])


async def handle_chat(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    limits = request.app[LIMITS_KEY]
    family = served_as(engine.bundle.config)
    if family in DSM_ROUTES:  # Kyutai's chat clients show an error message (kind 5): say where to go instead
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        what, path = DSM_ROUTES[family]
        await ws.send_bytes(protocol.error(f"this server runs a {what} model ({family}), not a conversation "
                                           f"model: use the websocket at {path} (see the README)"))
        await ws.close()
        return ws
    if (refusal := _sent_elsewhere(request)) is not None:
        return refusal
    ws = web.WebSocketResponse(max_msg_size=limits.max_message_bytes + 1, heartbeat=30,
                               timeout=limits.close_timeout_s, writer_limit=limits.send_buffer_bytes)
    await ws.prepare(request)
    if not engine.ready.is_set():
        # Kyutai's clients wait for the handshake before they record: holding it back until the model is warm
        # loses none of the user's words; only a warm-up that never ends gets an error.
        try:
            await asyncio.wait_for(engine.ready.wait(), limits.warmup_wait_s)
        except asyncio.TimeoutError:
            await ws.send_bytes(protocol.error("the server is still warming up; try again in a moment"))
            await ws.close()
            return ws
    try:
        settings = SessionSettings.from_query(dict(request.query), engine.defaults)
    except ProtocolError as exc:
        await ws.send_bytes(protocol.error(str(exc)))
        await ws.close()
        return ws

    outbox = Outbox(limits.outbox_frames)
    slot = engine.acquire(settings, outbox.put)
    if slot is None:
        logger.info("refused a session: all %d slots busy", engine.max_sessions)
        await ws.send_bytes(protocol.error(f"server busy: every conversation slot ({engine.max_sessions}) "
                                           "is taken, try again later"))
        await ws.close()
        return ws
    logger.info("session in slot %d from %s", slot.index, request.remote)
    session = ChatSession(request, ws, engine, slot, outbox, limits, request.app[POOL_KEY])
    info = _session_info(engine, slot, settings)
    # Falling behind or catching up: metadata again, the session's info with the stream's state added (Kyutai's
    # clients keep the latest metadata as the server's info, so it stays whole).
    slot.on_status = lambda status: outbox.put_status(protocol.metadata({**info, "stream": status}))
    request.app[SESSIONS_KEY].add(session)
    try:
        await ws.send_bytes(protocol.handshake())
        await ws.send_bytes(protocol.metadata(info))
        await session.run()
    finally:
        request.app[SESSIONS_KEY].discard(session)
        engine.release(slot)
        logger.info("session in slot %d ended after %d steps%s%s", slot.index, slot.steps,
                    f", {outbox.dropped} unsent frame(s) dropped" if outbox.dropped else "",
                    f" ({session.closed_because})" if session.closed_because else "")
    return ws


def _refusal_before_upgrade(engine: Engine) -> web.Response | None:
    """HTTP 503 for a balancer that will try another backend: this one is warming up or has no free slot."""
    if not engine.ready.is_set():
        reason = "the server is still warming up"
    elif engine.active_sessions >= engine.max_sessions:
        reason = f"server busy: every conversation slot ({engine.max_sessions}) is taken"
    else:
        return None
    engine.metrics.sessions_sent_elsewhere += 1
    logger.info("sent a session elsewhere (HTTP 503): %s", reason)
    return web.Response(status=503, text=reason + "\n", headers={"Retry-After": "2"})


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
