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


@dataclass
class Slot:
    index: int
    settings: SessionSettings
    on_output: OutputCallback  # called on the event loop with (pcm [frame_size] or None, text piece or None)
    max_backlog: int
    frames: collections.deque = field(default_factory=collections.deque)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    steps: int = 0
    dropped: int = 0
    fresh: bool = True  # needs its batch row reset before the first step


class Engine:
    """Owns the model, the batch slots and the step loop (run `await engine.run()` on the server's loop)."""

    def __init__(self, bundle: MoshiBundle, max_sessions: int, defaults: SessionSettings,
                 gather_s: float = 0.02, max_backlog_frames: int = 12) -> None:
        self.bundle = bundle
        self.max_sessions = max_sessions
        self.defaults = defaults
        self.gather_s = gather_s
        self.max_backlog_frames = max_backlog_frames
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
        for start in range(0, whole, self.frame_size):
            slot.frames.append(data[start:start + self.frame_size])
        slot.pending = data[whole:]
        while len(slot.frames) > slot.max_backlog:  # the machine or the client is behind: bound the latency
            slot.frames.popleft()
            slot.dropped += 1
        self._wake.set()

    # ---- step loop
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        await self._loop.run_in_executor(self._executor, self._start_streaming)
        try:
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
                    if elapsed > self.frame_size / self.bundle.sample_rate:
                        self.metrics.steps_late += 1
                        if self.metrics.steps_late % 25 == 1:
                            logger.warning("falling behind real time: a step of %d session(s) took %.0f ms "
                                           "(> 80 ms)", len(batch), 1000 * elapsed)
                    self._deliver(outputs)
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

    def _take_frames(self) -> dict[int, tuple[Slot, np.ndarray]]:
        batch = {}
        for slot in self.slots:
            if slot is not None and slot.frames:
                batch[slot.index] = (slot, slot.frames.popleft())
        return batch

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

    def _stop_streaming(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @torch.inference_mode()
    def _step(self, batch: dict[int, tuple[Slot, np.ndarray]]) -> list[tuple[Slot, np.ndarray | None, str | None]]:
        mimi, gen = self.bundle.mimi, self.generator
        fresh = [i for i, (slot, _) in batch.items() if slot.fresh]
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
        for i, (_, frame) in batch.items():
            pcm[i, 0] = torch.from_numpy(frame)
        mimi.set_active(active)
        codes = mimi.encode(pcm.to(self.device))
        if fresh:
            # As Kyutai's server: the first frame is fed to the LM, but Mimi's encoder restarts after it.
            mimi.reset_streaming(self._mask(fresh))
        gen.set_active(active)
        out = gen.step(codes[:, : gen.n_user])
        outputs: list[tuple[Slot, np.ndarray | None, str | None]] = []
        for i, (slot, _) in batch.items():
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
        for i, (slot, _) in batch.items():
            if not bool(valid[i]):
                continue
            pcm = None if pcm_out is None else pcm_out[i, 0]
            outputs.append((slot, pcm, self.bundle.text_piece(int(tokens[i]))))
        return outputs

    def _mask(self, indices: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.max_sessions, dtype=torch.bool)
        mask[indices] = True
        return mask
