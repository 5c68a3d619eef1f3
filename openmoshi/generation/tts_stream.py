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
from .tts import SpokenWord, Synthesizer, TtsStepper


@dataclass
class SpeechChunk:
    """What one step gives: audio (float [N], maybe empty) and the words whose timing became known."""

    pcm: torch.Tensor
    words: list[SpokenWord]


class SpeechOutput:
    """What one item's returned frames become: the frames to decode, the audio kept (as `speak` cuts it) and
    the words whose timing is known. Shared by `SpeechStream` and the batched TTS server."""

    def __init__(self, delay: int, frame_rate: float) -> None:
        self.delay, self.rate = delay, frame_rate
        self.frames = 0  # frames returned by the generator (delays undone)
        self.said = 0  # words of the transcript already reported

    @property
    def decodes_next(self) -> bool:
        """The next returned frame is past the audio delay: it must go through the codec's decoder."""
        return self.frames >= self.delay

    def add_frame(self, decoded: torch.Tensor | None, end_step: int | None) -> torch.Tensor:
        """Counts a returned frame; `decoded` [N] its audio when `decodes_next` was True. Returns the audio to
        send (empty for the two first decoded frames, as `speak`, and past the end step)."""
        index, self.frames = self.frames - self.delay, self.frames + 1
        if decoded is not None and index >= 2 and (end_step is None or index - 2 < end_step):
            return decoded
        return torch.zeros(0)

    def words(self, transcript: list[tuple[str, int]], end_step: int | None, finished: bool) -> list[SpokenWord]:
        """Words whose end is known: the next one started, or (when finished) the audio stopped."""
        known = len(transcript) if finished else len(transcript) - 1
        out = []
        while self.said < known:
            j = self.said
            word, s = transcript[j]
            begin = max((s - 2) / self.rate, 0.0)
            if j + 1 < len(transcript):
                finish = (transcript[j + 1][1] - 2) / self.rate
            else:
                end = end_step if end_step is not None else self.frames
                finish = min(end, max(self.frames - self.delay - 2, 0)) / self.rate
            out.append(SpokenWord(word, round(begin, 3), round(max(finish, begin), 3)))
            self.said += 1
        return out


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
        self.output = synth.speech_output()
        self.ended_text = False
        self.words_in = 0

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
        words = self.synth.stream_words(text, self.words_in == 0)
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
            decoded = None
            if self.output.decodes_next:
                mimi = self.synth.bundle.mimi
                decoded = mimi.decode(frame[:, 1:].clamp(min=0)).clamp(-1, 1).cpu()[0, 0]
            pcm = self.output.add_frame(decoded, self.state.end_step)
        return SpeechChunk(pcm, self.output.words(self.state.transcript, self.state.end_step, self.finished))
