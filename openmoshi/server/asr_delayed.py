"""/api/asr-streaming with a Moshi-style model whose delays make it ASR (paper §5.7; `DelayedTranscriber`):
each session's audio is teacher-forced as the model's own audio stream, the text is generated (greedy), and
comes out aligned with the audio max(delays) steps late. Batched as `AsrEngine`: a session's slot has its own
history of codes and its own start, so its words are those of `openmoshi transcribe` on its audio.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch

from ..bundle import MoshiBundle
from ..lm.families import SttSettings
from ..lm.model import UNGENERATED
from .asr import AsrEngine, AsrSlot


@dataclass
class DelayedAsrSlot(AsrSlot):
    history: collections.deque = field(default_factory=collections.deque)  # codes [dep_q], [0] = newest frame


class DelayedAsrEngine(AsrEngine):
    """`AsrEngine` for a Moshi-style ASR model: no silence prefix, no first frame fed twice, text greedy; the
    tokens of a session's first max(delays) steps are UNGENERATED (-2): they are no frame of its audio."""

    slot_type = DelayedAsrSlot

    def __init__(self, bundle: MoshiBundle, max_sessions: int, gather_s: float = 0.02) -> None:
        super().__init__(bundle, max_sessions, gather_s)
        cfg = bundle.config
        self.settings = SttSettings()  # the returned text is aligned with the audio: no offset
        self.delay_steps = cfg.max_delay  # frame n's text comes out at the session's step n + max(delays)
        self.defaults = dataclasses.replace(self.defaults, text_temperature=0.0)  # greedy, as `transcribe`
        self.audio_delays = cfg.delays[1:1 + cfg.dep_q]
        self._user = torch.full((max_sessions, cfg.n_user, 1), -1, dtype=torch.long, device=self.device) \
            if cfg.n_user else None

    def _start(self, slot: AsrSlot) -> None:
        slot.first = False  # no silence prefix, no first frame fed twice

    @torch.inference_mode()
    def _step(self, batch: dict) -> list:
        mimi, gen, dep_q = self.bundle.mimi, self.generator, self.bundle.config.dep_q
        fresh = [i for i, (slot, *_) in batch.items() if slot.fresh]
        if fresh:
            mimi.reset_streaming(self._mask(fresh))
            gen.reset(self._mask(fresh))
            for i in fresh:
                gen.configure_slot(i, temp_text=0.0)
        active = self._mask(list(batch))
        pcm = self._input
        for i, (_, frame, _) in batch.items():
            pcm[i, 0] = torch.from_numpy(frame)
        mimi.set_active(active)
        codes = mimi.encode(pcm.to(self.device))[:, :dep_q, 0].cpu()  # [B, dep_q]
        forced = torch.full((self.max_sessions, dep_q), -1, dtype=torch.long)
        for i, (slot, *_) in batch.items():
            slot.history.appendleft(codes[i])
            while len(slot.history) > max(self.audio_delays) + 1:
                slot.history.pop()
            for k, delay in enumerate(self.audio_delays):
                if delay < len(slot.history):
                    forced[i, k] = slot.history[delay][k]
        gen.set_active(active)
        out = gen.step(self._user, replace_audio=forced.to(self.device))
        mimi.set_active(None)
        gen.set_active(None)
        tokens = [UNGENERATED] * self.max_sessions if out is None else out[:, 0, 0].cpu().tolist()
        outputs = []
        for i, (slot, *_) in batch.items():
            slot.fresh = False
            slot.steps += 1
            outputs.append((slot, int(tokens[i]), []))
        return outputs
