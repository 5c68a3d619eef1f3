"""Moshi-style models as streaming ASR or TTS through their delays alone (paper §5.7; `DelayedMode`).

The same LM and Generator as a conversation; only which side is forced changes. Moshi's own audio stream (the
dep_q generated codebooks) is the speech, its text stream the words of that speech; another input stream (a
user stream) gets no token (-1, a zero embedding), as Kyutai's TTS models feed theirs.

ASR (text behind the audio): the recording is teacher-forced into Moshi's stream: at step s codebook k is
replaced by the code of frame s - delays[1 + k] (nothing before frame 0), the grid a teacher-forced pass sees,
and only the text is sampled (greedy by default, as the paper). The Generator undoes the delays, so the text
comes out aligned with the audio, max(delays) steps late:

    step s            0    1   ...  25   26  ...        (delays [25, 0, 1, ...]: text 2 s behind)
    semantic, forced  a0   a1  ...  a25  a26
    text, sampled     -    -   ...  x0   x1             position s holds the text of frame s - 25
    returned          None ...      x0   x1             text of frame s - max(delays)

TTS (audio behind the text): the text is forced word by word as the model asks (`MoshiTextForcer`), the audio
is sampled; the returned frames hold the text and audio of the same frame, so a word forced at step s sounds at
frame s - delays[0].
"""

from __future__ import annotations

import contextlib
import typing as tp
from collections import deque

import torch

from ..bundle import MoshiBundle
from ..errors import ConfigError
from ..lm.families import DelayedMode, SttSettings
from .generator import Generator
from .stt import DEFAULT_EOS_HEAD, DEFAULT_EOS_THRESHOLD, StreamingTranscriber, SttStep
from .tts import (
    TEXT_TOP_K,
    ForcingState,
    ItemStepper,
    Speech,
    SpokenWord,
    TextForcer,
    TtsRun,
    TtsSettings,
    TtsTokens,
    Word,
    run_stepper,
    script_to_words,
)
from .tts_stream import SpeechOutput


def _mode(bundle: MoshiBundle, kind: str) -> DelayedMode:
    mode = DelayedMode.from_config(bundle.config)
    if mode is None or mode.kind != kind:
        raise ConfigError(f"{bundle.source or 'this model'} is not a Moshi-style {kind.upper()} model: its delays "
                          f"{bundle.config.delays} put {'the text' if kind == 'asr' else 'the audio'} no later "
                          "than the other side (paper §5.7)")
    return mode


class DelayedTranscriber(StreamingTranscriber):
    """`StreamingTranscriber` for a Moshi-style ASR model (same interface; steps are aligned with the audio: the
    n-th step returned is the text of the n-th frame fed; the first max(delays) frames give no step yet)."""

    def __init__(self, bundle: MoshiBundle, batch_size: int = 1, generation: dict | None = None,
                 seed: int | None = None, eos_head: int = DEFAULT_EOS_HEAD,
                 eos_threshold: float = DEFAULT_EOS_THRESHOLD) -> None:
        if generation is None:  # a conversation model's text temperature; the paper's ASR is greedy
            generation = {**bundle.generation, "temp_text": 0.0}
        super().__init__(bundle, batch_size, generation, seed, eos_head, eos_threshold)
        cfg = bundle.config
        self.audio_delays = cfg.delays[1:1 + cfg.dep_q]
        self._history: deque[torch.Tensor] = deque(maxlen=max(self.audio_delays) + 1)  # [0] = the newest frame
        device = bundle.lm.device
        self._user = torch.full((batch_size, cfg.n_user, 1), -1, dtype=torch.long, device=device) \
            if cfg.n_user else None

    @staticmethod
    def _check_model(bundle: MoshiBundle) -> None:
        _mode(bundle, "asr")

    @staticmethod
    def _settings(bundle: MoshiBundle) -> SttSettings:
        return SttSettings()  # no silence prefix, and the returned text is aligned with the audio

    def flush_samples(self) -> int:
        """max(delays) frames bring out the text of the last frame; 1 s more lets its last word end."""
        return self.bundle.config.max_delay * self.frame + self.bundle.sample_rate

    @contextlib.contextmanager
    def streaming(self) -> tp.Iterator[DelayedTranscriber]:
        self._history.clear()
        with super().streaming():
            yield self

    def _step(self, frame: torch.Tensor) -> SttStep | None:
        codes = self.bundle.mimi.encode(frame)[:, :self.bundle.config.dep_q, 0]  # [B, dep_q]
        self._history.appendleft(codes)
        forced = torch.full_like(codes, -1)
        for k, delay in enumerate(self.audio_delays):
            if delay < len(self._history):
                forced[:, k] = self._history[delay][:, k]
        out = self.gen.step(self._user, replace_audio=forced)
        if out is None:
            return None
        text = out[:, 0, 0]
        heads = [h.float() for h in self.gen.extra_heads()]
        assert self._eos is not None
        return SttStep(text, heads, self._eos.update(text, heads))


class MoshiTextForcer(TextForcer):
    """The text forcing of a Moshi-style TTS (paper §5.7): any token but PAD is the model asking for the next
    word. Moshi's text stream puts EPAD on the step before a word, so a sampled EPAD is fed as is and the word's
    pieces follow; a sampled piece (the EPAD is dropped between adjacent words) starts the word's pieces at once.
    The transcript records the step of each word's first piece."""

    def step(self, step: int, state: ForcingState, sampled: int) -> int:
        t = self.tokens
        asked = sampled != t.pad
        token = super().step(step, state, t.new_word if asked else t.pad)
        if token == t.new_word and state.queued:  # a word starts: EPAD now, or (a piece sampled) the word now
            if sampled != t.new_word and asked:
                return state.queued.popleft()
            text, _ = state.transcript[-1]
            state.transcript[-1] = (text, step + 1)
        return token


class DelayedSynthesizer:
    """TTS with a Moshi-style model whose delays put the audio behind the text; one voice (the model's), no
    conditioning. `speak` and `generate` as `Synthesizer`'s; `stepper`, `stream_words` and `speech_output` as
    well (the batched TTS server)."""

    multi_speaker = False
    # No second text stream, and no frames to skip: the Generator returns frames whose audio is there already.
    settings = TtsSettings(delay_steps=0)

    def __init__(self, bundle: MoshiBundle, temp: float = 0.6, padding_bonus: float = 0.0, max_padding: int = 8,
                 initial_padding: int = 2, final_padding: int = 4, max_steps: int = 30_000,
                 seed: int | None = None, top_k: int = 250) -> None:
        self.mode = _mode(bundle, "tts")
        cfg = bundle.config
        self.bundle = bundle
        self.tokens = TtsTokens(cfg.text_card + 1, new_word=cfg.existing_text_end_padding_id,
                                pad=cfg.existing_text_padding_id)
        self.forcer = MoshiTextForcer(self.tokens, 0, max_padding, initial_padding)
        self.temp, self.padding_bonus, self.top_k = temp, padding_bonus, top_k
        self.final_padding, self.max_steps, self.seed = final_padding, max_steps, seed

    def words(self, text: str | tp.Sequence[str]) -> list[Word]:
        turns = [text] if isinstance(text, str) else list(text)
        return script_to_words(self.bundle.tokenizer, self.tokens, self.bundle.mimi.frame_rate, turns,
                               multi_speaker=False)

    def stream_words(self, text: str, first: bool) -> list[Word]:
        """The words of one piece of streamed text (as `words`: the speech is the same however it is split)."""
        return self.words(text)

    def stepper(self, scripts: list[list[Word]], voices: list | None = None) -> DelayedStepper:
        if voices is not None and any(v is not None for v in voices):
            raise ConfigError("a Moshi-style TTS model speaks in its own voice: it takes no voice")
        return DelayedStepper(self, scripts)

    def speech_output(self) -> DelayedSpeechOutput:
        return DelayedSpeechOutput(self.mode.text_delay, self.bundle.mimi.frame_rate)

    @torch.no_grad()
    def generate(self, scripts: list[list[Word]], on_step: tp.Callable[[int], None] | None = None) -> TtsRun:
        """Frames [B, 1 + dep_q, F] (delays undone: frame f's forced text and sampled audio), each item's end (the
        step it asked for a word past its last) and its words' steps."""
        return run_stepper(DelayedStepper(self, scripts), self.max_steps, self.bundle.config.dep_q, on_step)

    def speak(self, texts: list[str | tp.Sequence[str]],
              on_step: tp.Callable[[int], None] | None = None) -> list[Speech]:
        """Audio and timed words of each text (a list of strings is one speaker's successive turns)."""
        run = self.generate([self.words(text) for text in texts], on_step)
        mimi = self.bundle.mimi
        rate, frame = mimi.frame_rate, mimi.frame_size
        codes = run.frames[:, 1:].clamp(min=0)
        with torch.no_grad(), mimi.streaming(codes.shape[0]):
            pcm = [mimi.decode(codes[..., i:i + 1]).clamp(-1, 1).cpu() for i in range(codes.shape[-1])]
        audio = torch.cat(pcm, dim=-1) if pcm else torch.zeros(codes.shape[0], 1, 0)
        shift = self.mode.text_delay  # text step s is frame s - shift
        out = []
        for i, end in enumerate(run.end_steps):
            stop = codes.shape[-1] if end is None else min(max(end - shift, 0), codes.shape[-1])
            steps = run.transcripts[i]
            words = []
            for j, (word, s) in enumerate(steps):
                begin = min(max(s - shift, 0), stop)
                finish = min(steps[j + 1][1] - shift, stop) if j + 1 < len(steps) else stop
                words.append(SpokenWord(word, round(begin / rate, 3), round(max(finish, begin) / rate, 3)))
            out.append(Speech(audio[i, :, :stop * frame], words, end is not None))
        return out


class DelayedStepper(ItemStepper):
    """`DelayedSynthesizer.generate` one step at a time, as `TtsStepper` (inside `stepper.gen.streaming(B)`):
    words may be appended to `states[i].words` between steps, `step(active)` advances only some items, `restart`
    gives an item a fresh start with its own sampling (a server session)."""

    def __init__(self, synth: DelayedSynthesizer, scripts: list[list[Word]]) -> None:
        self.synth = synth
        cfg, lm = synth.bundle.config, synth.bundle.lm
        batch = len(scripts)
        self.states = [synth.forcer.start(words) for words in scripts]
        self.steps = [0] * batch
        self.delay = 0
        self._active = [True] * batch
        self._silent_steps = min(cfg.delays[1:1 + cfg.dep_q])  # before it every audio position is an initial token
        self._max_delay = cfg.max_delay
        pad = synth.tokens.pad

        def on_logits(logits: torch.Tensor) -> torch.Tensor | None:
            if not synth.padding_bonus:
                return None
            logits = logits.clone()
            logits[:, pad] += synth.padding_bonus
            return logits

        def on_text(sampled: torch.Tensor) -> torch.Tensor:
            fed = [synth.forcer.step(self.steps[i], self.states[i], token) if self._active[i] else token
                   for i, token in enumerate(sampled.tolist())]
            return torch.tensor(fed, dtype=torch.long, device=sampled.device)

        self.gen = Generator(lm, temp=synth.temp, temp_text=synth.temp, top_k=synth.top_k,
                             top_k_text=min(synth.top_k, TEXT_TOP_K), seed=synth.seed,
                             text_logits_hook=on_logits, text_hook=on_text)
        self._user = torch.full((batch, cfg.n_user, 1), -1, dtype=torch.long, device=lm.device) \
            if cfg.n_user else None
        self._silent = torch.full((batch, cfg.dep_q), -1, dtype=torch.long, device=lm.device)

    def item_finished(self, i: int) -> bool:
        """Asked for a word past its last one, and the frames up to that step (+ final padding) are out."""
        end = self.states[i].end_step
        made = max(self.steps[i] - self._max_delay, 0)  # frames returned (the Generator undoes the delays)
        return end is not None and made >= end - self.synth.mode.text_delay + self.synth.final_padding

    def restart(self, i: int, conditions: dict | None, temp: float, seed: int | None, top_k: int = 250) -> None:
        """Item i starts anew (no words yet) with its own sampling; a Moshi-style model has no conditions."""
        self.states[i] = self.synth.forcer.start([])
        self.steps[i] = 0
        self._restart_sampling(i, temp, seed, top_k)


class DelayedSpeechOutput(SpeechOutput):
    """`SpeechOutput` for a Moshi-style TTS (as `DelayedSynthesizer.speak` cuts it): every returned frame is
    audio; a word forced at step s sounds at frame s - text_delay; the audio stops at the end step's frame."""

    def __init__(self, text_delay: int, frame_rate: float) -> None:
        super().__init__(0, frame_rate)
        self.shift = text_delay

    def add_frame(self, decoded: torch.Tensor | None, end_step: int | None) -> torch.Tensor:
        index, self.frames = self.frames, self.frames + 1
        if decoded is not None and (end_step is None or index < end_step - self.shift):
            return decoded
        return torch.zeros(0)

    def words(self, transcript: list[tuple[str, int]], end_step: int | None, finished: bool) -> list[SpokenWord]:
        """Words whose end is known: the next one started (its step, ahead of the audio), or (finished) the audio
        stopped. Equal to `speak`'s when the text ends; a speech cut short may time its words past its audio."""
        known = len(transcript) if finished else len(transcript) - 1
        stop = self.frames if end_step is None else min(max(end_step - self.shift, 0), self.frames)
        out = []
        while self.said < known:
            j = self.said
            word, s = transcript[j]
            begin = max(s - self.shift, 0)
            finish = transcript[j + 1][1] - self.shift if j + 1 < len(transcript) else stop
            if end_step is not None:
                begin, finish = min(begin, stop), min(finish, stop)
            out.append(SpokenWord(word, round(begin / self.rate, 3), round(max(finish, begin) / self.rate, 3)))
            self.said += 1
        return out
