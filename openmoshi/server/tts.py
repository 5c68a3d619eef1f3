"""Streaming text-to-speech at /api/tts_streaming (the msgpack protocol of Kyutai's DSM clients, see
`dsm_protocol`): words in as they come, 80 ms audio frames out, then word timings, then a normal close.

Sessions take turns on the model (as Kyutai's single-stream TTS server): up to `max_sessions` are accepted, one
speaks while the others wait in arrival order. Each is a `SpeechStream`, so its audio equals `openmoshi speak`
with the same voice, temperature, guidance and seed. Query parameters: voice (a file of --voice-dir), format
(PcmMessagePack), temperature, seed, cfg_alpha; auth_id for the token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import WSCloseCode, WSMsgType, web

from ..bundle import MoshiBundle
from ..errors import ConfigError, ProtocolError
from ..generation.tts import Synthesizer, voice_condition
from ..generation.tts_stream import SpeechStream
from ..lm.conditioners import TensorInput
from . import dsm_protocol as dsm
from .asr import wait_ready
from .limits import SessionLimits
from .metrics import Metrics

logger = logging.getLogger(__name__)

MAX_PENDING_WORDS = 2000  # words queued ahead of the speech before the server stops reading (backpressure)


@dataclass
class TtsOptions:
    """Server-side TTS defaults; a session may change temperature, seed and guidance in its query."""

    voice_dir: Path | None = None
    default_voice: str | None = None
    temperature: float = 0.6
    cfg_coef: float = 2.0
    max_seconds: float = 300.0  # audio of one session


@dataclass
class TtsSlot:
    """A session's place (what /metrics and /health count)."""

    index: int
    steps: int = 0
    dropped: int = 0
    behind: bool = False
    latency_s: float = 0.0
    frames: list = field(default_factory=list)


class TtsEngine:
    """The model, its step thread and the turn of the sessions."""

    def __init__(self, bundle: MoshiBundle, max_sessions: int, options: TtsOptions | None = None) -> None:
        self.bundle = bundle
        self.max_sessions = max_sessions
        self.options = options or TtsOptions()
        self.metrics = Metrics()
        self.frame_s = bundle.frame_size / bundle.sample_rate
        self.slots: list[TtsSlot | None] = [None] * max_sessions
        self.ready = asyncio.Event()
        self.turn = asyncio.Lock()  # fair: waiters speak in arrival order
        self.queued_frames = 0
        self.torch_threads = torch.get_num_threads()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-tts")
        self._stopped = asyncio.Event()
        probe = Synthesizer(bundle)  # checks the model (tts family, conditioners)
        self.multi_speaker = probe.multi_speaker
        self.voice_dim = bundle.config.conditioners.get("speaker_wavs", {}).get("tensor", {}).get("dim") \
            if self.multi_speaker else None

    @property
    def active_sessions(self) -> int:
        return sum(s is not None for s in self.slots)

    def acquire(self) -> TtsSlot | None:
        for index, slot in enumerate(self.slots):
            if slot is None:
                self.slots[index] = slot = TtsSlot(index)
                self.metrics.sessions_started += 1
                return slot
        self.metrics.sessions_rejected += 1
        return None

    def release(self, slot: TtsSlot) -> None:
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None

    def synthesizer(self, temperature: float, cfg_coef: float, seed: int | None) -> Synthesizer:
        steps = int(self.options.max_seconds * self.bundle.mimi.frame_rate)
        return Synthesizer(self.bundle, temp=temperature, cfg_coef=cfg_coef, max_steps=steps, seed=seed)

    def voice(self, name: str | None) -> TensorInput | None:
        """The voice embedding a query names (a file of --voice-dir), or the default one; ProtocolError if none."""
        if not self.multi_speaker:
            if name:
                raise ProtocolError("this model takes no voice embedding; leave out `voice`")
            return None
        name = name or self.options.default_voice
        if not name:
            raise ProtocolError("this model needs a voice: add ?voice=NAME (a file of the server's --voice-dir)")
        root = self.options.voice_dir
        if root is None:
            raise ProtocolError("the server has no --voice-dir: it cannot load voices")
        path = resolve_voice(root, name)
        try:
            return voice_condition(str(path))
        except ConfigError as exc:
            raise ProtocolError(f"voice {name!r}: {exc}") from None

    async def run(self) -> None:
        """Warm-up (a short speech), then nothing: sessions step the model themselves, one at a time."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        await loop.run_in_executor(self.pool, self._warm_up)
        logger.info("tts warmed up in %.2f s: ready", time.perf_counter() - start)
        self.ready.set()
        await self._stopped.wait()
        self.pool.shutdown(wait=True)

    def stop(self) -> None:
        self._stopped.set()

    def _warm_up(self) -> None:
        torch.set_grad_enabled(False)
        voice = None
        if self.multi_speaker:
            voice = voice_condition(torch.zeros(1, self.voice_dim, 1))
        stream = SpeechStream(self.synthesizer(self.options.temperature, self.options.cfg_coef, 0), voice)
        with stream.streaming():
            stream.add_text("hello")
            stream.end_text()
            for _ in range(stream.stepper.delay + 8):
                if stream.finished:
                    break
                stream.step()
        self.torch_threads = torch.get_num_threads()


def resolve_voice(root: Path, name: str) -> Path:
    """NAME inside root: the file itself, NAME.safetensors, or NAME.<anything>.safetensors (Kyutai's tts-voices
    names its embeddings `voice.wav.1e68beda@240.safetensors` and its clients ask for `voice.wav`)."""
    root = root.resolve()
    if not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise ProtocolError(f"voice {name!r}: give a path inside the voice folder")
    base = (root / name).resolve()
    if root not in base.parents:
        raise ProtocolError(f"voice {name!r}: give a path inside the voice folder")
    candidates = [base] if base.suffix in (".safetensors", ".sft") else []
    candidates += [base.with_name(base.name + ".safetensors")]
    candidates += sorted(base.parent.glob(glob_escape(base.name) + ".*.safetensors")) if base.parent.is_dir() else []
    for path in candidates:
        if path.is_file():
            return path
    raise ProtocolError(f"no voice {name!r} in the server's voice folder")


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@dataclass
class TtsQuery:
    voice: str | None
    temperature: float
    cfg_coef: float
    seed: int | None

    @classmethod
    def parse(cls, query: dict[str, str], options: TtsOptions) -> TtsQuery:
        fmt = query.get("format", "PcmMessagePack")
        if fmt != "PcmMessagePack":
            raise ProtocolError(f"format={fmt!r} is not supported: use format=PcmMessagePack")

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = query.get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ProtocolError(f"query parameter {name}={raw!r} is not a number") from None
            if not math.isfinite(value) or not low <= value <= high:
                raise ProtocolError(f"query parameter {name}={raw!r} is outside [{low:g}, {high:g}]")
            return value

        seed = query.get("seed")
        if seed is not None and not seed.strip().lstrip("-").isdigit():
            raise ProtocolError(f"query parameter seed={seed!r} is not an integer")
        return cls(query.get("voice") or None, number("temperature", options.temperature, 0.0, 10.0),
                   number("cfg_alpha", options.cfg_coef, 0.0, 20.0), int(seed) if seed is not None else None)


class TtsSession:
    """One client: its text is read while earlier sessions speak; then its speech streams out."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine: TtsEngine, slot: TtsSlot,
                 limits: SessionLimits, stream: SpeechStream) -> None:
        self.request, self.ws, self.engine, self.slot, self.limits = request, ws, engine, slot, limits
        self.stream = stream
        self.texts: list[str] = []  # received, not yet given to the stream (it is only touched between steps)
        self.eos = False
        self.changed = asyncio.Event()  # text or end of text arrived, or the stream took the texts
        self.closed_because: str | None = None
        self.client_gone = False

    async def run(self) -> None:
        """Speaks, then closes (normally, or after an Error saying why)."""
        reader = asyncio.create_task(self._receive_loop())
        try:
            problem = await self._speak()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if problem != "gone":
            await self.end(problem, WSCloseCode.OK if problem is None else WSCloseCode.POLICY_VIOLATION)

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
        while not self.ws.closed:
            while len(self.texts) + self.stream.pending_words > MAX_PENDING_WORDS:
                self.changed.clear()
                await self.changed.wait()
            message = await self.ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                self.client_gone = True
                self.changed.set()
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
            if msg["type"] == "Text":
                self.texts.append(msg["text"])
            else:
                self.eos = True
            self.changed.set()

    async def _speak(self) -> str | None:
        """Steps the stream while the text allows; None when it is all said, else why it stopped ("gone": the
        client left or stopped reading)."""
        loop = asyncio.get_running_loop()
        pool = self.engine.pool
        idle = self.limits.idle_timeout_s
        async with self.engine.turn:
            stack = contextlib.ExitStack()
            await loop.run_in_executor(pool, self.stream.open, stack)
            try:
                last_input = loop.time()
                while not self.stream.finished:
                    if self.client_gone:
                        return "gone"
                    if self.texts:
                        texts, self.texts = self.texts, []
                        await loop.run_in_executor(pool, self._add_texts, texts)
                        last_input = loop.time()
                        self.changed.set()
                    if self.eos and not self.texts and not self.stream.ended_text:
                        self.stream.end_text()
                    if not self.stream.can_step:
                        remaining = last_input + idle - loop.time()
                        if remaining <= 0:
                            return f"closed: no text received for {idle:g} s (idle timeout); send Eos at the end"
                        self.changed.clear()
                        if not (self.texts or self.eos or self.client_gone):
                            with contextlib.suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(self.changed.wait(), remaining)
                        continue
                    chunk = await loop.run_in_executor(pool, self.stream.step)
                    self.slot.steps += 1
                    if not await self._send_chunk(chunk):
                        return "gone"
                if self.stream.reached_limit:
                    return f"stopped: the speech reached the server's limit of {self.engine.options.max_seconds:g} s"
                return None
            finally:
                await loop.run_in_executor(pool, stack.close)

    def _add_texts(self, texts: list[str]) -> None:
        for text in texts:
            self.stream.add_text(text)

    async def _send_chunk(self, chunk) -> bool:
        messages = []
        if chunk.pcm.numel():
            messages.append(dsm.pack_audio(chunk.pcm.numpy()))
        for word in chunk.words:
            messages.append(dsm.pack({"type": "Text", "text": word.word, "start_s": word.start, "stop_s": word.end}))
        for message in messages:
            try:
                await asyncio.wait_for(self.ws.send_bytes(message), self.limits.send_stall_s)
            except asyncio.TimeoutError:
                self.closed_because = f"the client read nothing for {self.limits.send_stall_s:g} s"
                if self.request.transport is not None:
                    self.request.transport.abort()
                return False
            except (ConnectionError, RuntimeError):
                return False
        return True


async def handle_tts(request: web.Request, engine: TtsEngine, limits: SessionLimits,
                     sessions: set) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=limits.max_message_bytes + 1, heartbeat=30,
                               timeout=limits.close_timeout_s, writer_limit=limits.send_buffer_bytes)
    await ws.prepare(request)
    if not await wait_ready(ws, engine, limits):
        return ws
    try:
        query = TtsQuery.parse(dict(request.query), engine.options)
        voice = engine.voice(query.voice)
        synth = engine.synthesizer(query.temperature, query.cfg_coef, query.seed)
        stream = SpeechStream(synth, voice)
    except (ProtocolError, ConfigError) as exc:
        await ws.send_bytes(dsm.error(str(exc)))
        await ws.close()
        return ws
    slot = engine.acquire()
    if slot is None:
        await ws.send_bytes(dsm.error(f"server busy: every speech slot ({engine.max_sessions}) is taken, "
                                      "try again later"))
        await ws.close()
        return ws
    session = TtsSession(request, ws, engine, slot, limits, stream)
    sessions.add(session)
    logger.info("tts session in slot %d from %s", slot.index, request.remote)
    try:
        await ws.send_bytes(dsm.pack({"type": "Ready"}))
        await session.run()
    finally:
        sessions.discard(session)
        engine.release(slot)
        logger.info("tts session in slot %d ended after %d steps%s", slot.index, slot.steps,
                    f" ({session.closed_because})" if session.closed_because else "")
    return ws
