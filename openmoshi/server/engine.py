"""Batched real-time inference for many conversations: one batch slot per session, one shared model step.

Each session pushes its user audio (PCM) into its slot; the engine steps whenever some slot has a full
80 ms frame, waiting at most `gather_s` for the other sessions so that their frames share the step. Slots
without a frame are frozen for that step (`set_active`): their state does not move, so a session's output
depends only on its own audio, never on who else is connected or when their audio arrives.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bundle import MoshiBundle
from ..generation.generator import Generator
from .metrics import Metrics
from .protocol import SessionSettings

logger = logging.getLogger(__name__)

OutputCallback = tp.Callable[[np.ndarray | None, str | None], None]
BEHIND_HOLD_S = 2.0  # a session is "behind" until this long after its last dropped frame
STANDING_QUEUE_S = 1.0  # a queue of 3+ frames for this long means steps are not catching up: cut it


@dataclass
class Slot:
    index: int
    settings: SessionSettings
    on_output: OutputCallback  # called on the event loop with (pcm [frame_size] or None, text piece or None)
    max_backlog: int
    frames: collections.deque = field(default_factory=collections.deque)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    steps: int = 0
    received: int = 0  # user frames queued: each is stepped, dropped or still waiting
    dropped: int = 0  # user frames dropped because the session fell behind (missed audio = dropped x 80 ms)
    fresh: bool = True  # needs its batch row reset before the first step
    latency_s: float = 0.0  # last frame's wait + step: from its arrival to Moshi's answer to it
    behind: bool = False  # input is being dropped; back to live after a while without drops
    last_drop: float = 0.0  # monotonic time of the last drop
    standing_since: float | None = None  # since when 3+ frames have been waiting
    reported: tuple = (False, 0)  # (behind, dropped) last told to the client
    last_report: float = 0.0
    on_status: tp.Callable[[dict], None] | None = None  # told when falling behind or catching up (event loop)


class Engine:
    """Owns the model, the batch slots and the step loop (run `await engine.run()` on the server's loop)."""

    def __init__(self, bundle: MoshiBundle, max_sessions: int, defaults: SessionSettings,
                 gather_s: float = 0.02, max_backlog_frames: int = 12,
                 standing_queue_s: float | None = STANDING_QUEUE_S) -> None:
        # max_backlog_frames and standing_queue_s (None: never cut) bound a late session's latency by dropping
        # its oldest input; tests that compare conversations exactly turn both off.
        self.bundle = bundle
        self.max_sessions = max_sessions
        self.defaults = defaults
        self.gather_s = gather_s
        self.max_backlog_frames = max_backlog_frames
        self.standing_queue_s = standing_queue_s
        self.metrics = Metrics()
        self.frame_size = bundle.frame_size
        self.device = bundle.lm.device
        self.generator = Generator(bundle.lm, **bundle.generation)
        self.slots: list[Slot | None] = [None] * max_sessions
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-step")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack = None
        self._running = False
        self._input = torch.zeros(max_sessions, 1, self.frame_size)
        self.ready = asyncio.Event()  # set once warmed up: /health says "ok" and sessions get their handshake
        self.torch_threads = torch.get_num_threads()  # as seen by the step thread, once it has run
        self.warmed_sizes: list[int] = []  # batch sizes whose step ran during warm-up

    # ---- sessions
    def acquire(self, settings: SessionSettings, on_output: OutputCallback) -> Slot | None:
        """A free slot for a new session, or None when all `max_sessions` are taken."""
        for index, slot in enumerate(self.slots):
            if slot is None:
                slot = Slot(index, settings, on_output, self.max_backlog_frames)
                self.slots[index] = slot
                self.metrics.sessions_started += 1
                return slot
        self.metrics.sessions_rejected += 1
        return None

    def release(self, slot: Slot) -> None:
        if 0 <= slot.index < len(self.slots) and self.slots[slot.index] is slot:
            self.slots[slot.index] = None
            self.metrics.frames_dropped += slot.dropped

    @property
    def active_sessions(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def push_audio(self, slot: Slot, pcm: np.ndarray) -> None:
        """Queue user PCM (float32 mono at 24 kHz); complete frames become available to the step loop."""
        if pcm.size == 0:
            return
        data = np.concatenate([slot.pending, pcm.astype(np.float32, copy=False)])
        whole = len(data) // self.frame_size * self.frame_size
        now = time.monotonic()
        for start in range(0, whole, self.frame_size):
            slot.frames.append((now, data[start:start + self.frame_size]))
            slot.received += 1
        slot.pending = data[whole:]
        while len(slot.frames) > slot.max_backlog:  # the machine or the client is behind: bound the latency
            slot.frames.popleft()  # the oldest: what is kept is the newest audio, at most max_backlog late
            slot.dropped += 1
            slot.last_drop = now
        self._wake.set()

    @property
    def queued_frames(self) -> int:
        """User frames waiting for a step, over all sessions."""
        return sum(len(s.frames) for s in self.slots if s is not None)

    # ---- step loop
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        await self._loop.run_in_executor(self._executor, self._start_streaming)
        try:
            start = time.perf_counter()
            await self._loop.run_in_executor(self._executor, self._warm_up)
            logger.info("warmed up in %.2f s (%d torch thread(s)): ready", time.perf_counter() - start,
                        self.torch_threads)
            self.ready.set()
            while self._running:
                await self._wake.wait()
                self._wake.clear()
                while self._running and any(s is not None and s.frames for s in self.slots):
                    await self._gather()
                    batch = self._take_frames()
                    if not batch:
                        break
                    start = time.perf_counter()
                    try:
                        outputs = await self._loop.run_in_executor(self._executor, self._step, batch)
                    except Exception:  # a failing step must not end every conversation's loop
                        logger.exception("model step failed; dropping this step's frames")
                        self.metrics.steps_failed += 1
                        continue
                    elapsed = time.perf_counter() - start
                    self.metrics.record_step(elapsed, len(batch))
                    self._track(batch)
                    if elapsed > self.frame_s:
                        self.metrics.steps_late += 1
                        if self.metrics.steps_late % 25 == 1:
                            logger.warning("falling behind real time: a step of %d session(s) took %.0f ms "
                                           "(> 80 ms)", len(batch), 1000 * elapsed)
                    self._deliver(outputs)
                    # Not kept until the next step: a session that has ended would stay alive through them (its
                    # slot, outbox and unsent audio) for as long as the server is idle.
                    del batch, outputs
        finally:
            await self._loop.run_in_executor(self._executor, self._stop_streaming)

    def stop(self) -> None:
        self._running = False
        self._wake.set()

    async def _gather(self) -> None:
        """Give the other sessions up to `gather_s` to deliver their frame, so they share this step."""
        deadline = time.monotonic() + self.gather_s
        while time.monotonic() < deadline:
            if all(s.frames for s in self.slots if s is not None):
                return
            await asyncio.sleep(0.002)

    def _take_frames(self) -> dict[int, tuple[Slot, np.ndarray, float]]:
        """Each waiting session's oldest frame. A queue that stands (2+ frames behind for STANDING_QUEUE_S: late
        steps, not a network burst) is cut to its newest frame: latency returns to one step instead of staying
        at the backlog for the rest of the conversation when steps barely keep up."""
        batch = {}
        now = time.monotonic()
        for slot in self.slots:
            if slot is None or not slot.frames:
                continue
            if len(slot.frames) <= 2:
                slot.standing_since = None
            elif slot.standing_since is None:
                slot.standing_since = now
            elif self.standing_queue_s is not None and now - slot.standing_since >= self.standing_queue_s:
                while len(slot.frames) > 1:
                    slot.frames.popleft()
                    slot.dropped += 1
                slot.last_drop = now
                slot.standing_since = None
            arrived, frame = slot.frames.popleft()
            batch[slot.index] = (slot, frame, arrived)
        return batch

    def _track(self, batch: dict[int, tuple[Slot, np.ndarray, float]]) -> None:
        """Each stepped session's latency and live/behind state; its client hears of every change (and, while
        behind, of the audio missed so far, at most once a second)."""
        now = time.monotonic()
        for slot, _, arrived in batch.values():
            slot.latency_s = now - arrived
            behind = slot.dropped > 0 and now - slot.last_drop < BEHIND_HOLD_S
            changed = behind != slot.behind
            slot.behind = behind
            if slot.on_status is None or (slot.behind, slot.dropped) == slot.reported:
                continue
            if changed or now - slot.last_report >= 1.0:
                slot.reported = (slot.behind, slot.dropped)
                slot.last_report = now
                slot.on_status(self.status(slot))

    def status(self, slot: Slot) -> dict:
        """What a client is told about its stream (metadata): live or behind, audio missed, latency."""
        return {"state": "behind" if slot.behind else "live",
                "missed_audio_s": round(slot.dropped * self.frame_size / self.bundle.sample_rate, 3),
                "latency_s": round(slot.latency_s, 3), "queued_s": round(len(slot.frames) * self.frame_s, 3)}

    @property
    def frame_s(self) -> float:
        return self.frame_size / self.bundle.sample_rate

    def _deliver(self, outputs: list[tuple[Slot, np.ndarray | None, str | None]]) -> None:
        for slot, pcm, text in outputs:
            if self.slots[slot.index] is slot:  # the session may have left during the step
                slot.on_output(pcm, text)

    # ---- model side (runs in the step thread)
    def _start_streaming(self) -> None:
        torch.set_grad_enabled(False)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.bundle.mimi.streaming(self.max_sessions))
        self._stack.enter_context(self.generator.streaming(self.max_sessions))

    def _warm_up(self) -> None:
        """Runs every batch size's step (1..max_sessions sessions) until it returns audio, on silence.

        The first steps of a fresh process pack weights, pick kernels and size caches (0.25-2 s on a CPU): done
        here, no user's first words are dropped. The rows used are reset when a real session takes them.
        """
        silence = np.zeros(self.frame_size, dtype=np.float32)
        self.warmed_sizes = []
        for size in range(1, self.max_sessions + 1):
            slots = [Slot(i, self.defaults, lambda *_: None, 1) for i in range(size)]
            for _ in range(self.generator.max_delay + 2):
                if self._step({slot.index: (slot, silence, 0.0) for slot in slots}):
                    break
            self.warmed_sizes.append(size)
        self.torch_threads = torch.get_num_threads()

    def _stop_streaming(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @torch.inference_mode()
    def _step(self, batch: dict[int, tuple[Slot, np.ndarray, float]]) -> list[tuple[Slot, np.ndarray | None, str | None]]:
        mimi, gen = self.bundle.mimi, self.generator
        fresh = [i for i, (slot, *_) in batch.items() if slot.fresh]
        if fresh:
            mask = self._mask(fresh)
            mimi.reset_streaming(mask)
            gen.reset(mask)
            for i in fresh:
                slot = batch[i][0]
                gen.configure_slot(i, temp=slot.settings.audio_temperature, top_k=slot.settings.audio_topk,
                                   temp_text=slot.settings.text_temperature, top_k_text=slot.settings.text_topk,
                                   text_seed=slot.settings.text_seed, audio_seed=slot.settings.audio_seed)
        active = self._mask(list(batch))
        pcm = self._input  # [B, 1, frame_size], reused every step; frozen rows keep stale audio, unused
        for i, (_, frame, _) in batch.items():
            pcm[i, 0] = torch.from_numpy(frame)
        mimi.set_active(active)
        codes = mimi.encode(pcm.to(self.device))
        if fresh:
            # As Kyutai's server: the first frame is fed to the LM, but Mimi's encoder restarts after it.
            mimi.reset_streaming(self._mask(fresh))
        gen.set_active(active)
        out = gen.step(codes[:, : gen.n_user])
        outputs: list[tuple[Slot, np.ndarray | None, str | None]] = []
        for slot, *_ in batch.values():
            slot.fresh = False
            slot.steps += 1
        if out is None:
            return outputs
        valid = active & (out[:, 0, 0] >= 0).cpu()  # -2: a restarted item still in its first steps
        pcm_out = None
        if out.shape[1] > 1 and bool(valid.any()):  # text-only models (e.g. speech-to-text) send no audio
            mimi.set_active(valid)
            pcm_out = mimi.decode(out[:, 1:].clamp(min=0)).float().cpu().numpy()
        mimi.set_active(None)
        gen.set_active(None)
        tokens = out[:, 0, 0].cpu().tolist()
        for i, (slot, *_) in batch.items():
            if not bool(valid[i]):
                continue
            pcm = None if pcm_out is None else pcm_out[i, 0]
            outputs.append((slot, pcm, self.bundle.text_piece(int(tokens[i]))))
        return outputs

    def _mask(self, indices: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.max_sessions, dtype=torch.bool)
        mask[indices] = True
        return mask
