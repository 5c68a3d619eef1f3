"""Batched streaming text to speech: every /api/tts_streaming session has a row of one `TtsStepper`, stepped
together; a row whose next words have not arrived yet is frozen for that step (its state, random streams and
codec state do not move), so a session's audio is that of `SpeechStream` alone, i.e. of `openmoshi speak`.

Each session has its own voices (the cross-attention rows of its slot), guidance value (a condition on distilled
models), temperature, top-k, seed and step limit. A Moshi-style model whose delays make it TTS (paper §5.7) is
served the same way, with `DelayedSynthesizer`'s steps: its own voice, no conditions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bundle import MoshiBundle
from ..errors import ConfigError, ProtocolError
from ..generation.tts import Synthesizer, voices_condition
from ..generation.tts_stream import SpeechOutput
from ..lm.conditioners import TensorInput
from ..lm.families import DelayedMode
from .metrics import Metrics
from .tts_request import TtsOptions, resolve_voice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ended:
    """Why a session's speech ended: "" = all said; `error` False = a limit the client set (max_seq_len)."""

    reason: str = ""
    error: bool = True


# (pcm float32 [N] or empty, words [(text, start_s, stop_s)], None while the speech goes on)
TtsOutput = tuple[np.ndarray, list[tuple[str, float, float]], Ended | None]


@dataclass
class TtsSlot:
    index: int
    conditions: dict
    temp: float
    seed: int | None
    on_output: tp.Callable[[TtsOutput], None]  # called on the event loop after each of its steps
    top_k: int = 250
    max_steps: int | None = None  # the client's max_seq_len (None: the server's limit)
    texts: list[str] = field(default_factory=list)  # received, for the next step (event loop side)
    new_conditions: dict | None = None  # a Voice message's, for the next step (event loop side)
    eos: bool = False
    fresh: bool = True
    words_in: int = 0
    ended_text: bool = False
    pending_words: int = 0  # words tokenized, not yet spoken (step thread side, read by the session)
    output: SpeechOutput | None = None
    steps: int = 0
    # what /metrics reads of a slot
    dropped: int = 0
    behind: bool = False
    latency_s: float = 0.0
    frames: tuple = ()


class TtsEngine:
    """The model, the batch rows and the step loop (run `await engine.run()` on the server's loop)."""

    def __init__(self, bundle: MoshiBundle, max_sessions: int, options: TtsOptions | None = None) -> None:
        self.bundle = bundle
        self.max_sessions = max_sessions
        self.options = options = options or TtsOptions()
        steps = int(options.max_seconds * bundle.mimi.frame_rate)
        mode = DelayedMode.from_config(bundle.config)
        if mode is not None and mode.kind == "tts":
            from ..generation.delayed import DelayedSynthesizer
            self.synth = DelayedSynthesizer(bundle, temp=options.temperature, max_steps=steps)
        else:
            self.synth = Synthesizer(bundle, temp=options.temperature, cfg_coef=options.cfg_coef, max_steps=steps)
        self.multi_speaker = self.synth.multi_speaker
        self.metrics = Metrics()
        self.frame_s = bundle.frame_size / bundle.sample_rate
        self.slots: list[TtsSlot | None] = [None] * max_sessions
        self.ready = asyncio.Event()
        self.queued_frames = 0
        self.torch_threads = torch.get_num_threads()
        self._wake = asyncio.Event()
        self._running = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-tts")
        self._stack: contextlib.ExitStack | None = None
        # Every session's voice must have the length of the batch's cross-attention rows: the default voice's.
        try:
            self._base_voice = self.voices([]) if options.default_voice else self._any_voice()
        except ProtocolError as exc:
            raise ConfigError(f"--voice {options.default_voice}: {exc}") from None
        self.stepper = self.synth.stepper([[] for _ in range(max_sessions)],
                                          [self._base_voice] * max_sessions if self.multi_speaker else None)
        self.guidance = self.stepper.gen.cfg_coef  # 1 when distilled (a condition), else a second pass
        self.width = None if self._base_voice is None else self._base_voice.tensor.shape[1]

    # ---- sessions
    def voices(self, names: list[str]) -> TensorInput | None:
        """The voice embeddings a query names (files of --voice-dir; several = one per speaker slot), or the
        default one; ProtocolError if none."""
        if not self.multi_speaker:
            if names:
                what = "speaks in its own voice (a Moshi-style model)" if self.guidance_free else \
                    "takes no voice embedding"
                raise ProtocolError(f"this model {what}; leave out `voice` / `voices`")
            return None
        names = names or ([self.options.default_voice] if self.options.default_voice else [])
        if not names:
            raise ProtocolError("this model needs a voice: add ?voice=NAME (a file of the server's --voice-dir)")
        if self.options.voice_dir is None:
            raise ProtocolError("the server has no --voice-dir: it cannot load voices")
        paths = [str(resolve_voice(self.options.voice_dir, name)) for name in names]
        try:
            return voices_condition(paths)
        except ConfigError as exc:
            raise ProtocolError(f"voice {', '.join(names)}: {exc}") from None

    @property
    def guidance_free(self) -> bool:
        """A Moshi-style TTS: no conditions, so no voices and no guidance."""
        return not isinstance(self.synth, Synthesizer)

    def _any_voice(self) -> TensorInput | None:
        """Without --voice: the first voice of --voice-dir (or a silent one) sets the voices' length."""
        if not self.multi_speaker:
            return None
        root = self.options.voice_dir
        first = next(iter(sorted(root.rglob("*.safetensors"))), None) if root is not None else None
        if first is not None:
            return voices_condition([str(first)])
        return voices_condition([torch.zeros(1, self.voice_dim, 1)])

    @property
    def voice_dim(self) -> int:
        """The width of this multi-speaker model's voice embeddings ([1, dim, frames])."""
        return self.bundle.config.conditioners["speaker_wavs"]["tensor"]["dim"]

    def conditions(self, voice: TensorInput | None, cfg_coef: float | None) -> dict | None:
        """One session's conditions (cfg_coef None: the server's --cfg-coef); ProtocolError when they cannot
        share the batch."""
        if self.guidance_free:
            if cfg_coef not in (None, 1.0):
                raise ProtocolError(f"cfg_alpha={cfg_coef:g}: a Moshi-style TTS model has no conditions to guide "
                                    "(leave it out, or 1)")
            return None
        cfg_coef = self.options.cfg_coef if cfg_coef is None else cfg_coef
        if voice is not None and voice.tensor.shape[1] != self.width:
            raise ProtocolError(f"this voice has {voice.tensor.shape[1]} cross-attention positions, the server's "
                                f"voices {self.width}: every voice of a server must have the same length")
        synth = Synthesizer(self.bundle, cfg_coef=cfg_coef)
        try:
            conditions, guidance = synth.conditions([voice])
        except ConfigError as exc:
            raise ProtocolError(str(exc)) from None
        if guidance != self.guidance:
            raise ProtocolError(f"cfg_alpha={cfg_coef:g}: this model runs guidance as a second pass, set for the "
                                f"whole server by --cfg-coef ({self.options.cfg_coef:g})")
        return conditions

    def voice_message(self, embeddings: np.ndarray) -> TensorInput:
        """A Voice message's embeddings [1, dim, frames] as this session's one speaker; ProtocolError if the
        model takes none or the shape does not fit."""
        if not self.multi_speaker:
            raise ProtocolError("this model takes no voice embedding: leave out the Voice message")
        if embeddings.shape[1] != self.voice_dim:
            raise ProtocolError(f"a Voice of shape {list(embeddings.shape)}: this model's voices are "
                                f"[1, {self.voice_dim}, frames]")
        return voices_condition([torch.from_numpy(embeddings)])

    def acquire(self, conditions: dict | None, temp: float, seed: int | None,
                on_output: tp.Callable[[TtsOutput], None], top_k: int = 250,
                max_steps: int | None = None) -> TtsSlot | None:
        for index, slot in enumerate(self.slots):
            if slot is None:
                self.slots[index] = slot = TtsSlot(index, conditions, temp, seed, on_output, top_k, max_steps)
                self.metrics.sessions_started += 1
                return slot
        self.metrics.sessions_rejected += 1
        return None

    def release(self, slot: TtsSlot) -> None:
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None

    def push_text(self, slot: TtsSlot, text: str) -> None:
        slot.texts.append(text)
        self._wake.set()

    def push_conditions(self, slot: TtsSlot, conditions: dict | None) -> None:
        """New conditions (a Voice message's) for a session that has said nothing yet: its row restarts with
        them at the next step."""
        slot.new_conditions = conditions

    def push_eos(self, slot: TtsSlot) -> None:
        slot.eos = True
        self._wake.set()

    @property
    def active_sessions(self) -> int:
        return sum(s is not None for s in self.slots)

    # ---- step loop
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._running = True
        await loop.run_in_executor(self._executor, self._start_streaming)
        try:
            start = time.perf_counter()
            await loop.run_in_executor(self._executor, self._warm_up)
            logger.info("tts warmed up in %.2f s: ready", time.perf_counter() - start)
            self.ready.set()
            while self._running:
                await self._wake.wait()
                self._wake.clear()
                while self._running:
                    work = self._collect()
                    if not work:
                        break
                    start = time.perf_counter()
                    try:
                        outputs = await loop.run_in_executor(self._executor, self._step, work)
                    except Exception:  # a failing step must not end every session's loop
                        logger.exception("tts step failed")
                        self.metrics.steps_failed += 1
                        for slot, *_ in work:
                            if self.slots[slot.index] is slot:
                                failed = Ended("the server failed to step the model")
                                slot.on_output((np.zeros(0, np.float32), [], failed))
                        continue
                    if not outputs:  # nobody could step: wait for text
                        break
                    self.metrics.record_step(time.perf_counter() - start, len(outputs))
                    for slot, output in outputs:
                        if self.slots[slot.index] is slot:
                            slot.on_output(output)
                    del work, outputs
        finally:
            await loop.run_in_executor(self._executor, self._stop_streaming)
            self._executor.shutdown(wait=False)

    def stop(self) -> None:
        self._running = False
        self._wake.set()

    def _collect(self) -> list[tuple[TtsSlot, list[str], bool]]:
        """Each live session with the text received since the last step (taken here, on the event loop)."""
        work = []
        for slot in self.slots:
            if slot is not None:
                if slot.new_conditions is not None:  # no step is running: the row restarts at the next one
                    slot.conditions, slot.new_conditions, slot.fresh = slot.new_conditions, None, True
                texts, slot.texts = slot.texts, []
                work.append((slot, texts, slot.eos))
        return work

    # ---- model side (the step thread)
    def _start_streaming(self) -> None:
        torch.set_grad_enabled(False)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.stepper.gen.streaming(self.max_sessions))
        self._stack.enter_context(self.bundle.mimi.streaming(self.max_sessions))

    def _stop_streaming(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _warm_up(self) -> None:
        """Every row says a few words on the base voice until audio comes out; a session restarts its row."""
        conditions = self.conditions(self._base_voice, None)
        slots = [TtsSlot(i, conditions, self.options.temperature, 0, lambda _: None)
                 for i in range(self.max_sessions)]
        work = [(slot, ["hello there, how are you"], True) for slot in slots]
        for _ in range(self.stepper.delay + self.stepper.gen.max_delay + 4):
            self._step(work)
            work = [(slot, [], True) for slot in slots]
        self.torch_threads = torch.get_num_threads()

    def _limit(self, slot: TtsSlot) -> int:
        return self.synth.max_steps if slot.max_steps is None else min(slot.max_steps, self.synth.max_steps)

    def _can_step(self, slot: TtsSlot) -> bool:
        i, stepper = slot.index, self.stepper
        if stepper.item_finished(i) or stepper.steps[i] >= self._limit(slot):
            return False
        return slot.ended_text or len(stepper.states[i].words) > self.synth.settings.second_stream_ahead

    @torch.inference_mode()
    def _step(self, work: list[tuple[TtsSlot, list[str], bool]]) -> list[tuple[TtsSlot, TtsOutput]]:
        stepper, mimi = self.stepper, self.bundle.mimi
        fresh = [slot for slot, *_ in work if slot.fresh]
        if fresh:
            mimi.reset_streaming(self._mask([s.index for s in fresh]))
            for slot in fresh:
                stepper.restart(slot.index, slot.conditions, slot.temp, slot.seed, slot.top_k)
                slot.output = self.synth.speech_output()
                slot.fresh = False
        for slot, texts, eos in work:
            for text in texts:
                words = self.synth.stream_words(text, slot.words_in == 0)
                stepper.states[slot.index].words.extend(words)
                slot.words_in += len(words)
            slot.ended_text = slot.ended_text or eos  # every Text came before the Eos
        stepped = [slot for slot, *_ in work if self._can_step(slot)]
        for slot, *_ in work:
            slot.pending_words = len(stepper.states[slot.index].words)
        if not stepped:
            return []
        active = self._mask([s.index for s in stepped])
        frame = stepper.step(active.tolist())
        returned = [s for s in stepped if frame is not None and int(frame[s.index, 0, 0]) >= 0]
        decode = [s for s in returned if s.output.decodes_next]
        pcm = None
        if decode:
            mimi.set_active(self._mask([s.index for s in decode]))
            pcm = mimi.decode(frame[:, 1:].clamp(min=0)).clamp(-1, 1).float().cpu()
            mimi.set_active(None)
        outputs = []
        for slot in stepped:
            i, state = slot.index, stepper.states[slot.index]
            slot.steps += 1
            chunk = np.zeros(0, np.float32)
            if slot in returned:
                decoded = pcm[i, 0] if slot in decode else None
                chunk = slot.output.add_frame(decoded, state.end_step).numpy()
            finished = stepper.item_finished(i) or stepper.steps[i] >= self._limit(slot)
            words = [(w.word, w.start, w.end) for w in slot.output.words(state.transcript, state.end_step, finished)]
            outputs.append((slot, (chunk, words, self._ended(slot) if finished else None)))
        return outputs

    def _ended(self, slot: TtsSlot) -> Ended:
        """Why a finished session's speech ended: all said (its text ended, maybe before the final padding),
        the client's max_seq_len, or the server's limit."""
        if self.stepper.states[slot.index].end_step is not None:
            return Ended()
        if slot.max_steps is not None and slot.max_steps <= self.synth.max_steps:
            return Ended(f"stopped at max_seq_len={slot.max_steps} steps "
                         f"({slot.max_steps / self.bundle.mimi.frame_rate:g} s) before the end of the text", False)
        return Ended(f"stopped: the speech reached the server's limit of {self.options.max_seconds:g} s")

    def _mask(self, indices: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.max_sessions, dtype=torch.bool)
        mask[indices] = True
        return mask
