"""Streaming text to speech: words arrive while the audio is generated (Kyutai's /api/tts_streaming).

The steps are `Synthesizer.generate`'s; a step only runs once the words the text forcer could need are there
(the next word and the second stream's lookahead, or the end of the text), so the tokens, the audio and the
word timings equal `Synthesizer.speak` over the whole text (same settings and seed). The audio is decoded
frame by frame and cut as `speak` cuts it: the first two decoded frames dropped, nothing past the end step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..lm.conditioners import TensorInput
from .tts import SpokenWord, Synthesizer, TtsStepper, script_to_words


@dataclass
class SpeechChunk:
    """What one step gives: audio (float [N], maybe empty) and the words whose timing became known."""

    pcm: torch.Tensor
    words: list[SpokenWord]


class SpeechStream:
    """One voice, text in word by word, 80 ms of audio out per step once the audio delay has passed.

        stream = SpeechStream(synth, voice)
        with stream.streaming():
            stream.add_text("Hello there,")
            stream.add_text("how are you?")
            stream.end_text()
            while not stream.finished:
                if stream.can_step:
                    chunk = stream.step()
    """

    def __init__(self, synth: Synthesizer, voice: TensorInput | None = None) -> None:
        self.synth = synth
        self.stepper = TtsStepper(synth, [[]], [voice])
        self.state = self.stepper.states[0]
        self.ended_text = False
        self.words_in = 0
        self._frames = 0  # frames returned by the generator (delays undone)
        self._said = 0  # words of the transcript already reported
        self._stack: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def streaming(self):
        with contextlib.ExitStack() as stack:
            self.open(stack)
            yield self

    def open(self, stack: contextlib.ExitStack) -> None:
        """Enter the model's and the codec's streaming state on `stack` (for callers that step from a thread)."""
        stack.enter_context(self.stepper.gen.streaming(1))
        stack.enter_context(self.synth.bundle.mimi.streaming(1))

    def add_text(self, text: str) -> int:
        """Queue the words of `text` (whitespace-separated); returns how many."""
        if self.ended_text:
            raise RuntimeError("add_text after end_text")
        first = self.words_in == 0
        words = script_to_words(self.synth.bundle.tokenizer, self.synth.tokens, self.synth.bundle.mimi.frame_rate,
                                [text], self.synth.multi_speaker and first, padding_between=1)
        self.state.words.extend(words)
        self.words_in += len(words)
        return len(words)

    def end_text(self) -> None:
        self.ended_text = True

    @property
    def pending_words(self) -> int:
        return len(self.state.words)

    @property
    def can_step(self) -> bool:
        """A step may not run into a missing word: the next word and the lookahead are queued, or the text ended."""
        if self.finished:
            return False
        return self.ended_text or len(self.state.words) > self.synth.settings.second_stream_ahead

    @property
    def finished(self) -> bool:
        return self.stepper.finished or self.stepper.step_idx >= self.synth.max_steps

    @property
    def reached_limit(self) -> bool:
        """Stopped by `max_steps` before the end of the text."""
        return self.stepper.step_idx >= self.synth.max_steps and self.state.end_step is None

    @torch.no_grad()
    def step(self) -> SpeechChunk:
        frame = self.stepper.step()
        pcm = torch.zeros(0)
        if frame is not None:
            index, self._frames = self._frames - self.stepper.delay, self._frames + 1
            if index >= 0:
                mimi = self.synth.bundle.mimi
                decoded = mimi.decode(frame[:, 1:].clamp(min=0)).clamp(-1, 1).cpu()[0, 0]
                end = self.state.end_step
                if index >= 2 and (end is None or index - 2 < end):
                    pcm = decoded
        return SpeechChunk(pcm, self._timed_words())

    def _timed_words(self) -> list[SpokenWord]:
        """Words whose end is known: the next one started, or (at the end) the audio stopped."""
        rate = self.synth.bundle.mimi.frame_rate
        said = self.state.transcript
        known = len(said) if self.finished else len(said) - 1
        out = []
        while self._said < known:
            j = self._said
            word, s = said[j]
            begin = max((s - 2) / rate, 0.0)
            if j + 1 < len(said):
                finish = (said[j + 1][1] - 2) / rate
            else:
                end = self.state.end_step if self.state.end_step is not None else self._frames
                finish = min(end, self._audio_frames()) / rate
            out.append(SpokenWord(word, round(begin, 3), round(max(finish, begin), 3)))
            self._said += 1
        return out

    def _audio_frames(self) -> int:
        """Output frames decoded so far (after the delay and the two dropped ones)."""
        return max(self._frames - self.stepper.delay - 2, 0)
