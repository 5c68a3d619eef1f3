"""Run Moshi on whole recordings: the user stream fed from audio, Moshi generating frame by frame."""

from __future__ import annotations

import collections
import time
import typing as tp
from dataclasses import dataclass

import torch

from ..bundle import MoshiBundle
from .generator import Generator
from .transcript import Transcript, transcript_from_tokens


@dataclass
class Answer:
    """Moshi's side of one conversation, aligned with the user's audio."""

    audio: torch.Tensor  # float [1, T], 24 kHz, same length as the user's input
    codes: torch.Tensor  # long [1 + dep_q, F]: text token then audio codes per frame
    transcript: Transcript


def answer_recordings(bundle: MoshiBundle, wavs: list[torch.Tensor], generation: dict | None = None,
                      seed: int | None = None, on_step: tp.Callable[[int, int], None] | None = None) -> list[Answer]:
    """Answers to user recordings (float [1, T] each, 24 kHz), generated as one batch.

    Shorter recordings are padded with silence; batch rows are independent, so each answer equals the
    one its recording gets alone (exactly so with greedy decoding).
    """
    mimi, lm = bundle.mimi, bundle.lm
    frame = mimi.frame_size
    lengths = [w.shape[-1] for w in wavs]
    frames = max(-(-n // frame) for n in lengths)
    batch = torch.zeros(len(wavs), 1, frames * frame)
    for i, w in enumerate(wavs):
        batch[i, :, : w.shape[-1]] = w
    batch = batch.to(lm.device)
    gen = Generator(lm, seed=seed, **(generation if generation is not None else bundle.generation))
    steps = frames + gen.max_delay  # the last frames' answers come max(delays) steps late
    codes_out: list[torch.Tensor] = []
    audio_out: list[torch.Tensor] = []
    with torch.inference_mode(), mimi.streaming(len(wavs)), gen.streaming(len(wavs)):
        silence = torch.zeros(len(wavs), 1, frame, device=lm.device)
        for step in range(steps):
            chunk = batch[..., step * frame:(step + 1) * frame] if step < frames else silence
            user = mimi.encode(chunk)
            out = gen.step(user[:, : gen.n_user])
            if out is not None:
                codes_out.append(out[..., 0].cpu())
                audio_out.append(mimi.decode(out[:, 1:].clamp(min=0)).float().cpu())
            if on_step is not None:
                on_step(step + 1, steps)
    codes = torch.stack(codes_out, dim=-1)[..., :frames]  # [B, 1 + dep_q, F]
    audio = torch.cat(audio_out, dim=-1)
    pad_ids = (bundle.config.existing_text_padding_id, bundle.config.existing_text_end_padding_id)
    answers = []
    for i, n in enumerate(lengths):
        tokens = codes[i, 0, : -(-n // frame)].tolist()
        transcript = transcript_from_tokens(tokens, bundle.tokenizer, mimi.frame_rate, pad_ids)
        answers.append(Answer(audio[i, :, :n], codes[i, :, : -(-n // frame)], transcript))
    return answers


@dataclass
class FrameAnswer:
    """Moshi's answer to one 80 ms frame of one recording, as `stream_answers` yields it."""

    row: int  # which recording
    index: int  # frame number in that recording
    user: torch.Tensor  # float [1, n]: the user's audio of this frame (n < frame_size only at the end)
    moshi: torch.Tensor  # float [1, n]: Moshi's audio for the same span
    token: int  # Moshi's text token of this frame


class _Framer:
    """Cuts a stream of [1, n] blocks into [1, frame] frames; the last one is zero-padded."""

    def __init__(self, blocks: tp.Iterable[torch.Tensor], frame: int) -> None:
        self.blocks = iter(blocks)
        self.frame = frame
        self.buffer = torch.zeros(1, 0)

    def next(self) -> tuple[torch.Tensor, int] | None:
        """(frame [1, frame], valid samples) or None at the end."""
        while self.buffer.shape[-1] < self.frame:
            block = next(self.blocks, None)
            if block is None:
                break
            self.buffer = torch.cat([self.buffer, block.reshape(1, -1).float()], dim=-1)
        n = min(self.frame, self.buffer.shape[-1])
        if n == 0:
            return None
        frame = torch.nn.functional.pad(self.buffer[:, :n], (0, self.frame - n))
        self.buffer = self.buffer[:, n:]
        return frame, n


def stream_answers(bundle: MoshiBundle, sources: list[tp.Iterable[torch.Tensor]], generation: dict | None = None,
                   seed: int | None = None,
                   on_step: tp.Callable[[int], None] | None = None) -> tp.Iterator[FrameAnswer]:
    """Moshi's answers to recordings given as streams of float [1, n] blocks (24 kHz), frame by frame.

    The same numbers as `answer_recordings` (rows that end early are fed silence), but nothing grows with the
    recordings' length: a frame is read when it is fed and its answer yielded as soon as it exists.
    """
    mimi, lm = bundle.mimi, bundle.lm
    frame = mimi.frame_size
    rows = len(sources)
    framers = [_Framer(source, frame) for source in sources]
    waiting: list[collections.deque] = [collections.deque() for _ in range(rows)]  # user frames awaiting answers
    length: list[int | None] = [None] * rows  # frames per recording, known once it ended
    gen = Generator(lm, seed=seed, **(generation if generation is not None else bundle.generation))
    answered = steps = 0
    with torch.inference_mode(), mimi.streaming(rows), gen.streaming(rows):
        while True:
            chunk = torch.zeros(rows, 1, frame)
            for i, framer in enumerate(framers):
                if length[i] is not None:
                    continue
                got = framer.next()
                if got is None:
                    length[i] = answered + len(waiting[i])
                    continue
                chunk[i] = got[0]
                waiting[i].append(got[0][:, : got[1]])
            if all(n is not None for n in length) and answered >= max(length):
                break
            out = gen.step(mimi.encode(chunk.to(lm.device))[:, : gen.n_user])
            steps += 1
            if out is not None:
                audio = mimi.decode(out[:, 1:].clamp(min=0)).float().cpu()
                tokens = out[:, 0, 0].cpu().tolist()
                for i in range(rows):
                    if length[i] is None or answered < length[i]:
                        user = waiting[i].popleft()
                        yield FrameAnswer(i, answered, user, audio[i, :, : user.shape[-1]].clone(), int(tokens[i]))
                answered += 1
            if on_step is not None:
                on_step(steps)


class RealTimeMeter:
    """Real-time factor of a run: seconds of audio processed per second of compute."""

    def __init__(self, audio_seconds_per_step: float) -> None:
        self.per_step = audio_seconds_per_step
        self.start = time.perf_counter()

    def factor(self, steps: int) -> float:
        elapsed = time.perf_counter() - self.start
        return steps * self.per_step / elapsed if elapsed > 0 else 0.0
