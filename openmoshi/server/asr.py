"""Streaming speech-to-text at /api/asr-streaming (the msgpack protocol of Kyutai's DSM clients, see
`dsm_protocol`), batched: every session has a slot of one shared model step, as the chat engine's.

The stream of a session is the one `openmoshi transcribe` feeds: the model's silence prefix (added here), then
the client's audio. The first frame is stepped twice (a fresh Generator's first step reads only initial
tokens), and words are cut from the text tokens by `WordStream`, so a client that sends a recording followed
by `flush` silence gets the same words as `openmoshi transcribe`. Times are seconds of the client's audio.

A client may send audio faster than real time (Kyutai's file client sends its last 40 s of silence at once):
instead of closing it, the server stops reading once `input_burst_s` of its audio waits for the model, and
reads on as the steps catch up (TCP backpressure). Each step takes one frame per session, so a fast client
cannot slow the others down.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from aiohttp import web

from ..audio.opus import OpusDecoderStream
from ..bundle import MoshiBundle
from ..errors import ProtocolError
from ..generation.stt import WordStream
from ..lm.families import SttSettings
from . import dsm_protocol as dsm
from .dsm_session import CLIENT_GONE, DsmSession, accept, run_session
from .engine import Engine, Slot
from .limits import SessionLimits
from .protocol import SessionSettings

AsrOutput = tuple[int, list[float]]  # text token, class-0 probability of each extra head


@dataclass
class AsrSlot(Slot):
    first: bool = True  # the first frame is stepped twice
    prefix_frames: int = 0  # frames of server-side silence before the client's audio
    markers: collections.deque = field(default_factory=collections.deque)  # (step to reach, marker id)


class AsrEngine(Engine):
    """The chat engine's slots and step loop with a speech-to-text step: one text token (and the extra heads'
    probabilities) per session and frame."""

    slot_type = AsrSlot

    def __init__(self, bundle: MoshiBundle, max_sessions: int, gather_s: float = 0.02) -> None:
        gen = bundle.generation
        defaults = SessionSettings(text_temperature=gen["temp_text"], text_topk=gen["top_k_text"],
                                   audio_temperature=gen["temp"], audio_topk=gen["top_k"])
        # Nothing is dropped: a session's queue is bounded by the reader instead (AsrSession).
        super().__init__(bundle, max_sessions, defaults, gather_s, max_backlog_frames=1 << 30,
                         standing_queue_s=None)
        self.settings = SttSettings.from_config(bundle.config)
        self.rate = bundle.mimi.frame_rate
        self.delay_steps = math.ceil(self.settings.audio_delay_s * self.rate)
        cfg = bundle.config
        self.pad_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)

    def acquire_asr(self, on_output) -> AsrSlot | None:
        for index, slot in enumerate(self.slots):
            if slot is None:
                slot = self.slot_type(index, self.defaults, on_output, self.max_backlog_frames)
                self.slots[index] = slot
                self.metrics.sessions_started += 1
                self._start(slot)
                return slot
        self.metrics.sessions_rejected += 1
        return None

    def _start(self, slot: AsrSlot) -> None:
        """A new session: the model's silence prefix goes before the client's audio."""
        prefix = self.settings.prefix_samples(self.bundle.sample_rate)
        slot.prefix_frames = prefix // self.frame_size
        self.push_audio(slot, np.zeros(prefix, dtype=np.float32))

    def _warm_up(self) -> None:
        silence = np.zeros(self.frame_size, dtype=np.float32)
        self.warmed_sizes = []
        for size in range(1, self.max_sessions + 1):
            slots = [self.slot_type(i, self.defaults, lambda *_: None, 1) for i in range(size)]
            for _ in range(2):
                self._step({slot.index: (slot, silence, 0.0) for slot in slots})
            self.warmed_sizes.append(size)
        self.torch_threads = torch.get_num_threads()

    def _deliver(self, outputs) -> None:
        for slot, token, prs in outputs:
            if self.slots[slot.index] is slot:
                slot.on_output(token, prs)

    @torch.inference_mode()
    def _step(self, batch: dict[int, tuple[Slot, np.ndarray, float]]) -> list:
        mimi, gen = self.bundle.mimi, self.generator
        fresh = [i for i, (slot, *_) in batch.items() if slot.fresh]
        if fresh:
            mimi.reset_streaming(self._mask(fresh))
            gen.reset(self._mask(fresh))
            if gen.temp_text > 0:  # own random streams: a session's text never depends on the others
                for i in fresh:
                    gen.configure_slot(i)
        active = self._mask(list(batch))
        pcm = self._input
        for i, (_, frame, _) in batch.items():
            pcm[i, 0] = torch.from_numpy(frame)
        mimi.set_active(active)
        codes = mimi.encode(pcm.to(self.device))
        first = [i for i, (slot, *_) in batch.items() if slot.first]
        if first:  # as `transcribe`: a fresh stream's first frame is fed twice
            gen.set_active(self._mask(first))
            gen.step(codes)
        gen.set_active(active)
        out = gen.step(codes)
        heads = [h[:, 0].float().cpu() for h in gen.extra_heads()] if self.bundle.config.extra_heads_num_heads \
            else []
        mimi.set_active(None)
        gen.set_active(None)
        tokens = out[:, 0, 0].cpu().tolist()
        outputs = []
        for i, (slot, *_) in batch.items():
            slot.fresh = False
            slot.first = False
            slot.steps += 1
            outputs.append((slot, int(tokens[i]), [float(h[i]) for h in heads]))
        return outputs


class AsrSession(DsmSession):
    """One client of /api/asr-streaming: audio in (within a bounded queue), words, steps and markers out."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, engine: AsrEngine,
                 limits: SessionLimits) -> None:
        super().__init__(request, ws, engine, limits)
        self.words = WordStream(engine.bundle.tokenizer, engine.rate, *engine.pad_ids)
        self.offset_s = engine.settings.text_offset_s
        self.max_queued = max(1, int(limits.input_burst_s * engine.rate))
        self.slot: AsrSlot | None = None
        self.decoder: OpusDecoderStream | None = None  # for OggOpus messages, made on the first

    def on_output(self, token: int, prs: list[float]) -> None:
        """Called on the event loop after each step of this session."""
        slot = self.slot
        assert slot is not None
        for text, start, stop in (self.words.push(token) if token >= 0 else []):  # < 0: no frame yet
            self.outbox.put_nowait(dsm.pack({"type": "Word", "text": text, "start_time": self._time(start)}))
            self.outbox.put_nowait(dsm.pack({"type": "EndWord", "stop_time": max(self._time(stop),
                                                                                  self._time(start))}))
        step = slot.steps - slot.prefix_frames
        if step > 0 and self.engine.bundle.config.extra_heads_num_heads:  # as Kyutai: only with a VAD to report
            self.outbox.put_nowait(dsm.pack({"type": "Step", "step_idx": step - 1, "prs": prs,
                                             "buffered_pcm": len(slot.frames) * self.engine.frame_size}))
        while slot.markers and slot.markers[0][0] <= slot.steps:
            self.outbox.put_nowait(dsm.pack({"type": "Marker", "id": slot.markers.popleft()[1]}))
        self.stepped.set()

    def _time(self, frame: int) -> float:
        return round(max(frame / self.engine.rate - self.offset_s, 0.0), 3)

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.limits.idle_timeout_s
        last_input = loop.time()
        slot = self.slot
        assert slot is not None
        while not self.ws.closed:
            if await self._wait_while(lambda: len(slot.frames) > self.max_queued):  # read on once caught up
                last_input = loop.time()
            message = await self.receive_until_idle(last_input)
            if message is None:
                await self.end(f"closed: no audio received for {idle:g} s (idle timeout)")
                return
            if message.type in CLIENT_GONE:
                return
            msg = await self._parse(message, dsm.ASR_TYPES)
            if msg is None:
                continue
            last_input = loop.time()
            if msg["type"] == "Audio":
                self.engine.push_audio(slot, msg["pcm"])
            elif msg["type"] == "OggOpus":
                await self._opus(loop, msg["data"])
            elif msg["type"] == "Marker":  # echoed once the frames received so far are stepped and the delay passed
                slot.markers.append((slot.received + self.engine.delay_steps, msg["id"]))

    async def _opus(self, loop: asyncio.AbstractEventLoop, data: bytes) -> None:
        """Decodes Ogg-Opus pages off the event loop (at most `input_burst_s` of audio per message) and queues
        their audio; a bad stream restarts cleanly."""
        if self.decoder is None:
            self.decoder = OpusDecoderStream(self.engine.bundle.sample_rate)
        limit = int(self.limits.input_burst_s * self.engine.bundle.sample_rate)  # audio one message may hold
        pcm, error = await loop.run_in_executor(None, _decode, self.decoder, data, limit)
        if pcm.size:
            self.engine.push_audio(self.slot, pcm)
        if error is not None:
            self.decoder = None
            self.engine.metrics.protocol_errors += 1
            await self.ws.send_bytes(dsm.error(f"bad message: {error}"))

    async def _send_loop(self) -> None:
        while await self.send(await self.outbox.get()):
            pass


def _decode(decoder: OpusDecoderStream, data: bytes, limit: int) -> tuple[np.ndarray, ProtocolError | None]:
    try:
        decoder.push(data, sample_limit=limit)
        return decoder.read(), None
    except ProtocolError as exc:
        return decoder.read(), exc


async def handle_asr(request: web.Request, engine: AsrEngine, limits: SessionLimits,
                     sessions: set) -> web.StreamResponse:
    ws, ready = await accept(request, engine, limits)
    if not ready:
        return ws
    session = AsrSession(request, ws, engine, limits)
    slot = engine.acquire_asr(session.on_output)
    return await run_session(request, ws, engine, session, slot, sessions, "asr", "transcription")
