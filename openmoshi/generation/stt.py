"""Streaming speech-to-text with Kyutai's `stt` models: audio in, one text token per 80 ms frame out.

The text trails the audio by `audio_delay_s` (learnt, the model's delays are 0): a word spoken at time t comes
out near t + audio_delay_s. Feeding is Kyutai's (moshi.run_inference): `silence_prefix_s` of silence first,
the first frame fed twice (the first step of a Generator reads only initial tokens), and after the audio
`audio_delay_s + 1 s` of silence so the last words come out.

    stream time  |prefix silence|      the audio       | flush silence |
    text tokens  |  PAD ...     PAD EPAD ▁hel lo PAD ... EPAD ▁you ...  |   (audio_delay_s late)

The extra heads of the model (voice activity: the stt-1b heads give the probability that no new word comes
within a horizon) are read at every step; `EndOfSpeech` turns one of them into end-of-speech events.
"""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import asdict, dataclass, field

import torch

from ..bundle import MoshiBundle
from ..errors import AudioError, ConfigError
from ..lm.families import SttSettings
from .generator import Generator
from .transcript import WORD_START

# The head Kyutai's services read for end of turn ("no new word within 2 s") and their threshold.
DEFAULT_EOS_HEAD = 2
DEFAULT_EOS_THRESHOLD = 0.6


@dataclass
class SttStep:
    """What one 80 ms step of audio gives."""

    text: torch.Tensor  # long [B], the text token (PAD = no new text)
    heads: list[torch.Tensor]  # per extra head, float [B, extra_heads_dim] probabilities
    end_of_speech: torch.Tensor  # bool [B], True at the step speech is judged over


class EndOfSpeech:
    """End-of-speech events from an extra head: its class-0 probability ("no new word soon") rises above
    `threshold` after some text was heard. Fires once per stretch of speech."""

    def __init__(self, batch_size: int, head: int = DEFAULT_EOS_HEAD, threshold: float = DEFAULT_EOS_THRESHOLD,
                 pad_ids: tuple[int, ...] = (0, 3)) -> None:
        self.head, self.threshold, self.pad_ids = head, threshold, pad_ids
        self.heard = torch.zeros(batch_size, dtype=torch.bool)

    def update(self, text: torch.Tensor, heads: list[torch.Tensor]) -> torch.Tensor:
        text = text.cpu()
        spoken = torch.ones_like(self.heard)
        for pad in self.pad_ids:
            spoken &= text != pad
        self.heard |= spoken & (text >= 0)
        if not heads:
            return torch.zeros_like(self.heard)
        head = heads[min(self.head, len(heads) - 1)]
        done = (head[:, 0].float().cpu() > self.threshold) & self.heard & ~spoken
        self.heard &= ~done
        return done


class StreamingTranscriber:
    """Incremental ASR over a batch of audio streams; feed any number of samples at a time.

        stt = StreamingTranscriber(bundle, batch_size=2)
        with stt.streaming():
            stt.start()                       # feeds the silence prefix
            for chunk in chunks:              # float [B, 1, N], any N
                for step in stt.feed(chunk):  # one SttStep per whole 80 ms frame
                    ...
            steps = stt.flush()               # the delayed text of the end
    """

    def __init__(self, bundle: MoshiBundle, batch_size: int = 1, generation: dict | None = None,
                 seed: int | None = None, eos_head: int = DEFAULT_EOS_HEAD,
                 eos_threshold: float = DEFAULT_EOS_THRESHOLD) -> None:
        self._check_model(bundle)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle
        self.settings = self._settings(bundle)
        self.batch_size = batch_size
        self.gen = Generator(bundle.lm, seed=seed, **(generation if generation is not None else bundle.generation))
        self.frame = bundle.mimi.frame_size
        self.eos_head, self.eos_threshold = eos_head, eos_threshold
        cfg = bundle.config
        self.pad_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)
        self._pending: torch.Tensor | None = None
        self._first = True
        self._eos: EndOfSpeech | None = None

    @staticmethod
    def _check_model(bundle: MoshiBundle) -> None:
        if bundle.config.dep_q != 0:
            raise ConfigError(f"{bundle.source or 'this model'} generates audio (dep_q={bundle.config.dep_q}); "
                              "transcription needs a speech-to-text model (model_type 'stt')")

    @staticmethod
    def _settings(bundle: MoshiBundle) -> SttSettings:
        return SttSettings.from_config(bundle.config)

    def flush_samples(self) -> int:
        """Samples of silence `flush` feeds."""
        return self.settings.flush_samples(self.bundle.sample_rate)

    @contextlib.contextmanager
    def streaming(self) -> tp.Iterator[StreamingTranscriber]:
        mimi = self.bundle.mimi
        with torch.inference_mode(), mimi.streaming(self.batch_size), self.gen.streaming(self.batch_size):
            self._pending = torch.zeros(self.batch_size, 1, 0, device=self.bundle.lm.device)
            self._first = True
            self._eos = EndOfSpeech(self.batch_size, self.eos_head, self.eos_threshold, self.pad_ids)
            try:
                yield self
            finally:
                self._pending = None

    def start(self) -> list[SttStep]:
        """Feed the model's silence prefix (call once, before the audio)."""
        n = self.settings.prefix_samples(self.bundle.sample_rate)
        return self.feed(torch.zeros(self.batch_size, 1, n))

    def flush(self) -> list[SttStep]:
        """Feed the trailing silence that brings out the text of the audio's end."""
        return self.feed(torch.zeros(self.batch_size, 1, self.flush_samples()))

    def feed(self, pcm: torch.Tensor) -> list[SttStep]:
        """pcm float [B, 1, N] at 24 kHz (any N) -> one SttStep per whole frame now available."""
        if self._pending is None:
            raise RuntimeError("call feed() inside `with transcriber.streaming():`")
        if pcm.dim() != 3 or pcm.shape[0] != self.batch_size or pcm.shape[1] != 1:
            raise AudioError(f"audio must have shape [{self.batch_size}, 1, samples], got {tuple(pcm.shape)}")
        buffer = torch.cat([self._pending, pcm.to(self._pending)], dim=-1)
        whole = buffer.shape[-1] // self.frame * self.frame
        self._pending = buffer[..., whole:]
        steps = [self._step(buffer[..., i:i + self.frame]) for i in range(0, whole, self.frame)]
        return [step for step in steps if step is not None]

    def _step(self, frame: torch.Tensor) -> SttStep | None:
        codes = self.bundle.mimi.encode(frame)
        if self._first:  # the first step only reads initial tokens: feed the first frame twice, as Kyutai
            self.gen.step(codes)
            self._first = False
        out = self.gen.step(codes)
        assert out is not None  # stt models have no delays
        text = out[:, 0, 0]
        heads = [h.float() for h in self.gen.extra_heads()]
        assert self._eos is not None
        return SttStep(text, heads, self._eos.update(text, heads))


@dataclass
class TimedWord:
    word: str
    start: float  # seconds in the input audio
    end: float


@dataclass
class Transcription:
    """The transcript of one recording."""

    text: str
    words: list[TimedWord]
    tokens: list[int]  # text token of every frame of the padded stream, PAD included
    end_of_speech: list[float] = field(default_factory=list)  # times (s) the end-of-speech head fired
    duration: float = 0.0

    def to_json(self) -> dict:
        return {"text": self.text, "duration": self.duration, "words": [asdict(w) for w in self.words],
                "end_of_speech": self.end_of_speech, "tokens": self.tokens}


def words_from_tokens(tokens: list[int], tokenizer, frame_rate: float, offset_s: float, duration: float,
                      pad_id: int = 3, end_pad_id: int = 0) -> list[TimedWord]:
    """Timed words from an stt model's text stream (one token per frame).

    A word opens at its first piece (a piece starting with U+2581, or the first after an EPAD) and lasts until
    the next EPAD or the next word, at most 1 s past its last piece. EPAD (end of padding) marks where the model
    places the next word. Times are stream times minus `offset_s` (silence prefix + audio delay), clipped to
    [0, duration].
    """
    n_pieces = tokenizer.get_piece_size()
    groups: list[list[int]] = []  # frames of each word's pieces
    after_epad = False
    for frame, token in enumerate(tokens):
        if token == end_pad_id:
            after_epad = True
            continue
        if token == pad_id or not 0 <= token < n_pieces or tokenizer.is_control(token):
            continue
        if not groups or after_epad or tokenizer.id_to_piece(token).startswith(WORD_START):
            groups.append([])
        groups[-1].append(frame)
        after_epad = False
    boundaries = [f for f, t in enumerate(tokens) if t == end_pad_id]
    words = []
    for i, frames in enumerate(groups):
        last = frames[-1] + 1
        limit = min(groups[i + 1][0] if i + 1 < len(groups) else len(tokens), last + int(frame_rate))
        end = next((b for b in boundaries if last <= b < limit), limit)
        text = tokenizer.decode([tokens[f] for f in frames]).strip()
        if not text:
            continue

        def clip(frame: int) -> float:
            return round(min(max(frame / frame_rate - offset_s, 0.0), duration), 3)

        words.append(TimedWord(text, clip(frames[0]), max(clip(end), clip(frames[0]))))
    return words


class WordStream:
    """`words_from_tokens` one token at a time, for live transcripts: `push(token)` returns the words it
    completes, `finish()` those of the end of the stream, each as (text, start frame, end frame).

    A word is complete once no later token can join it: at an EPAD or at the first piece of the next word (or at
    the end), the same boundaries as `words_from_tokens`, so the words are the same.
    """

    def __init__(self, tokenizer, frame_rate: float, pad_id: int = 3, end_pad_id: int = 0) -> None:
        self.tokenizer, self.cap = tokenizer, int(frame_rate)
        self.pad_id, self.end_pad_id = pad_id, end_pad_id
        self.n_pieces = tokenizer.get_piece_size()
        self.frame = 0  # frames pushed so far
        self.after_epad = False
        self.word: list[tuple[int, int]] | None = None  # (frame, token) of the open word's pieces

    def push(self, token: int) -> list[tuple[str, int, int]]:
        frame, self.frame = self.frame, self.frame + 1
        if token == self.end_pad_id:
            self.after_epad = True
            return self._close(frame, epad=True)
        if token == self.pad_id or not 0 <= token < self.n_pieces or self.tokenizer.is_control(token):
            return []
        done = []
        if self.word is None or self.after_epad or self.tokenizer.id_to_piece(token).startswith(WORD_START):
            done = self._close(frame, epad=False)
            self.word = []
        assert self.word is not None
        self.word.append((frame, token))
        self.after_epad = False
        return done

    def finish(self) -> list[tuple[str, int, int]]:
        return self._close(self.frame, epad=False)

    def _close(self, frame: int, epad: bool) -> list[tuple[str, int, int]]:
        """Completes the open word at `frame`: its end is an EPAD there if within a second of its last piece,
        else the next word's start (or the end of the stream) capped at that second."""
        if not self.word:
            return []
        pieces, self.word = self.word, None
        last = pieces[-1][0] + 1
        end = frame if epad and frame < last + self.cap else min(frame, last + self.cap)
        text = self.tokenizer.decode([t for _, t in pieces]).strip()
        return [(text, pieces[0][0], end)] if text else []


def transcribe_recordings(bundle: MoshiBundle, wavs: list[torch.Tensor], generation: dict | None = None,
                          seed: int | None = None, eos_head: int = DEFAULT_EOS_HEAD,
                          eos_threshold: float = DEFAULT_EOS_THRESHOLD,
                          on_step: tp.Callable[[int, int], None] | None = None) -> list[Transcription]:
    """Transcribe recordings (float [1, T] each, 24 kHz) as one streamed batch; shorter ones are padded with
    silence, rows are independent."""
    if not wavs:
        return []
    stt = transcriber(bundle, len(wavs), generation, seed, eos_head, eos_threshold)
    sr, frame = bundle.sample_rate, bundle.frame_size
    lengths = [w.shape[-1] for w in wavs]
    frames = -(-max(lengths) // frame)
    batch = torch.zeros(len(wavs), 1, frames * frame)
    for i, w in enumerate(wavs):
        batch[i, :, :w.shape[-1]] = w
    total = (stt.settings.prefix_samples(sr) // frame + frames + stt.flush_samples() // frame)
    steps: list[SttStep] = []

    def progress(new: list[SttStep]) -> None:
        steps.extend(new)
        if on_step is not None:
            on_step(len(steps), total)

    with stt.streaming():
        progress(stt.start())
        for i in range(frames):
            progress(stt.feed(batch[..., i * frame:(i + 1) * frame]))
        progress(stt.flush())
    text = torch.stack([s.text for s in steps], dim=1).cpu()  # [B, steps]
    eos = torch.stack([s.end_of_speech for s in steps], dim=1)  # [B, steps]
    offset = stt.settings.text_offset_s
    rate = bundle.mimi.frame_rate
    out = []
    for i, n in enumerate(lengths):
        tokens = text[i].tolist()
        duration = n / sr
        words = words_from_tokens(tokens, bundle.tokenizer, rate, offset, duration, *stt.pad_ids)
        fired = [round(max(f / rate - offset, 0.0), 3) for f in eos[i].nonzero()[:, 0].tolist()]
        out.append(Transcription(" ".join(w.word for w in words), words, tokens,
                                 [t for t in fired if t <= duration + stt.settings.audio_delay_s], duration))
    return out


def transcriber(bundle: MoshiBundle, batch_size: int = 1, generation: dict | None = None, seed: int | None = None,
                eos_head: int = DEFAULT_EOS_HEAD, eos_threshold: float = DEFAULT_EOS_THRESHOLD) -> StreamingTranscriber:
    """The streaming transcriber of a model: an `stt` model's, or a Moshi-style model's in ASR mode (its delays
    put the text behind the audio, see `openmoshi.generation.delayed`)."""
    from ..lm.families import DelayedMode
    mode = DelayedMode.from_config(bundle.config)
    if mode is not None and mode.kind == "asr":
        from .delayed import DelayedTranscriber
        return DelayedTranscriber(bundle, batch_size, generation, seed, eos_head, eos_threshold)
    return StreamingTranscriber(bundle, batch_size, generation, seed, eos_head, eos_threshold)
