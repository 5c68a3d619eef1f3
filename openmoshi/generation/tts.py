"""Text to speech with Kyutai's `tts` models (delayed streams): the text is forced word by word when the model
asks for it, the audio follows `tts_config.audio_delay` seconds behind.

The model writes one text token per 80 ms step. It only chooses between PAD ("keep speaking the current word")
and WORD ("the next word starts now"); the `TextForcer` answers WORD by feeding the next word's pieces over the
following steps, and bounds the padding (`max_padding` in a row, `initial_padding` at the start, a word's
`padding` after it). Models with a second text stream (`second_stream_ahead` = N) also see, muxed into the same
token, the pieces of the word N ahead, and the WORD marker there:

    step         0    1    2     3     4    5     6    ...
    model says   -    -    WORD  PAD   PAD  WORD  PAD
    fed (main)   PAD  PAD  ▁hel  lo    PAD  ▁you  PAD        the word's pieces, then padding
    audio        -1 for the first `delay_steps` steps, then the sampled codes

Voices are conditioning embeddings (`speaker_wavs`, cross-attention; Kyutai's tts-voices files) or, for models
without them, an audio prompt whose codes are forced at the start. Classifier-free guidance runs a null branch
without the voice and the text (or, for models distilled for a fixed guidance, the coefficient is a condition).
"""

from __future__ import annotations

import logging
import re
import typing as tp
from collections import deque
from dataclasses import dataclass, field

import torch

from ..bundle import MoshiBundle
from ..errors import ConfigError
from ..lm.conditioners import LUTConditioner, TensorInput
from .generator import Generator

logger = logging.getLogger(__name__)

MAX_SPEAKERS = 5  # voice slots of the cross-attention source
TEXT_TOP_K = 25  # the text's top-k (Kyutai's TTS default); a smaller audio top-k lowers it too


@dataclass(frozen=True)
class TtsTokens:
    """Special text tokens of the TTS models; `card` (text_card + 1) multiplexes the second stream."""

    card: int
    new_word: int = 0
    pad: int = 3
    main: int = 1  # start of the main speaker's turn
    other: int = 2  # start of the other speaker's turn


@dataclass
class Word:
    """One word to say: its text pieces, and steps of forced padding after it (a pause when `tokens` is empty)."""

    tokens: list[int]
    text: str
    padding: int = 0


@dataclass
class ForcingState:
    """Where the forcing of one item stands."""

    words: deque[Word]
    remaining_padding: int  # PADs the model may still choose before a word is due
    forced_padding: int  # PADs it must still take
    queued: deque[int] = field(default_factory=deque)  # pieces of the current word not fed yet
    lookahead: deque[int] = field(default_factory=deque)  # pieces for the second stream
    end_step: int | None = None  # the step the model asked for a word past the last one
    transcript: list[tuple[str, int]] = field(default_factory=list)  # (word, step it started)

    def pieces_ahead(self, ahead: int) -> list[int]:
        for word in self.words:
            if word.tokens:
                ahead -= 1
                if ahead == 0:
                    return word.tokens
        return []


@dataclass
class TextForcer:
    """The text-forcing state machine (same decisions as Kyutai's TTS StateMachine)."""

    tokens: TtsTokens
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2

    def start(self, words: tp.Sequence[Word]) -> ForcingState:
        return ForcingState(deque(words), self.initial_padding, self.initial_padding)

    def _decide(self, state: ForcingState, sampled: int) -> int:
        """PAD or WORD, from the model's choice and the padding bounds."""
        t = self.tokens
        choice = sampled if sampled in (t.new_word, t.pad) else t.pad
        if state.queued or state.forced_padding > 0:
            return t.pad
        if state.remaining_padding <= 0:
            return t.new_word
        return choice

    def step(self, step: int, state: ForcingState, sampled: int) -> int:
        """The text token to feed after the model sampled `sampled` at `step`."""
        t = self.tokens
        choice = self._decide(state, sampled)
        if choice == t.new_word:
            if state.words:
                word = state.words.popleft()
                if word.tokens:
                    state.transcript.append((word.text, step))
                    state.queued.extend(word.tokens)
                    if self.second_stream_ahead:
                        state.lookahead.extend(state.pieces_ahead(self.second_stream_ahead))
                    state.remaining_padding = self.max_padding
                else:  # a pause: counts as padding
                    choice = t.pad
                state.forced_padding = word.padding
            else:  # asked for a word past the last one: the end
                choice = t.new_word if self.second_stream_ahead and state.end_step is None else t.pad
                if state.end_step is None:
                    state.end_step = step
        if choice == t.pad:
            state.remaining_padding = max(state.remaining_padding - 1, 0)
            state.forced_padding = max(state.forced_padding - 1, 0)
            main = state.queued.popleft() if state.queued else t.pad
        else:
            main = t.new_word
        if not self.second_stream_ahead:
            return main
        second = -1  # -1: nothing on the second stream (muxed as 0)
        if main == t.new_word:  # the WORD marker goes on the second stream, the main one moves on
            second = t.new_word
            main = state.queued.popleft() if state.queued else t.pad
        elif state.lookahead:
            second = state.lookahead.popleft()
        return (second + 1) * t.card + main


_BREAK_OR_SPACE = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")


def script_to_words(tokenizer, tokens: TtsTokens, frame_rate: float, turns: tp.Sequence[str],
                    multi_speaker: bool = True, padding_between: int = 0) -> list[Word]:
    """Words of a script (one string per speaker turn, the main speaker first). `<break time="0.5s"/>` inserts a
    pause; a turn's first word carries its speaker's token on multi-speaker models; `padding_between` forces
    that many pads after each word (clearer articulation)."""
    words: list[Word] = []
    last_speaker = None
    for index, line in enumerate(turns):
        first = True
        line = line.replace("\u2019", "'").replace(":", " ").replace("(", "").replace(")", "")

        def add(text: str, speaker: int = index % 2) -> None:
            nonlocal first, last_speaker
            pieces = list(tokenizer.encode(text))
            if first:
                if multi_speaker and last_speaker != speaker:
                    last_speaker = speaker
                    pieces.insert(0, (tokens.main, tokens.other)[speaker])
                first = False
            padding = max(0, padding_between + len(pieces) - 1) if padding_between > 0 else 0
            words.append(Word(pieces, text, padding))

        while line:
            match = _BREAK_OR_SPACE.search(line)
            if match is None:
                break
            text, line = line[:match.start()], line[match.end():]
            if text:
                add(text)
            if match.group(1):
                words.append(Word([], "", round(float(match.group(1)) * frame_rate)))
        if line:
            add(line)
    return words


@dataclass(frozen=True)
class TtsSettings:
    """Kyutai's `tts_config`: the audio delay behind the text, the second stream's lookahead."""

    delay_steps: int
    second_stream_ahead: int = 0
    multistream: bool = False

    @classmethod
    def from_bundle(cls, bundle: MoshiBundle) -> TtsSettings:
        raw = bundle.config.tts_config or {}
        delay = raw.get("audio_delay")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise ConfigError(f"tts_config.audio_delay must be a number of seconds >= 0, got {delay!r}")
        ahead = raw.get("second_stream_ahead", 0)
        if not isinstance(ahead, int) or ahead < 0:
            raise ConfigError(f"tts_config.second_stream_ahead must be an integer >= 0, got {ahead!r}")
        if ahead and not bundle.config.demux_second_text_stream:
            raise ConfigError("tts_config.second_stream_ahead needs demux_second_text_stream")
        if raw.get("multistream"):
            raise ConfigError("multistream TTS models are not supported yet")
        return cls(int(delay * bundle.mimi.frame_rate), ahead)


@dataclass
class SpokenWord:
    word: str
    start: float  # seconds in the output audio
    end: float


@dataclass
class Speech:
    audio: torch.Tensor  # float [1, T] at 24 kHz
    words: list[SpokenWord]
    finished: bool  # False when the step budget ran out before the last word


@dataclass
class TtsRun:
    """Raw result of `generate`: frames [B, 1 + dep_q, steps] (delays undone), end steps, word steps."""

    frames: torch.Tensor
    end_steps: list[int | None]
    transcripts: list[list[tuple[str, int]]]


def voice_condition(path_or_tensor: str | torch.Tensor, max_speakers: int = MAX_SPEAKERS) -> TensorInput:
    """A voice embedding file (Kyutai's tts-voices `*.safetensors`, key `speaker_wavs` [1, D, T]) as the
    cross-attention input [1, max_speakers * T, D] with the first speaker slot filled."""
    return voices_condition([path_or_tensor], max_speakers)


def voices_condition(voices: tp.Sequence[str | torch.Tensor], max_speakers: int = MAX_SPEAKERS) -> TensorInput:
    """Several speakers (Kyutai's multi-speaker conditioning): voice i fills speaker slot i of the
    cross-attention input [1, max_speakers * T, D]; every voice must have the same shape [1, D, T]."""
    if not 1 <= len(voices) <= max_speakers:
        raise ConfigError(f"give 1 to {max_speakers} voices (speaker slots), got {len(voices)}")
    embs = [_voice_embedding(v) for v in voices]
    _, dim, frames = embs[0].shape
    for v, emb in zip(voices, embs):
        if emb.shape[1:] != (dim, frames):
            name = v if isinstance(v, str) else "a voice"
            raise ConfigError(f"{name} has shape {tuple(emb.shape)}, the first voice [1, {dim}, {frames}]: "
                              "the voices of one speech must have the same length")
    tensor = torch.zeros(1, max_speakers, frames, dim)
    mask = torch.zeros(1, max_speakers, frames, dtype=torch.bool)
    for i, emb in enumerate(embs):
        tensor[0, i] = emb[0].t().float()
        mask[0, i] = True
    return TensorInput(tensor.view(1, -1, dim), mask.view(1, -1))


def _voice_embedding(path_or_tensor: str | torch.Tensor) -> torch.Tensor:
    if isinstance(path_or_tensor, torch.Tensor):
        emb = path_or_tensor
    else:
        from ..checkpoint import read_safetensors
        state = read_safetensors(path_or_tensor)
        if "speaker_wavs" not in state:
            raise ConfigError(f"{path_or_tensor} is not a voice embedding (no 'speaker_wavs' tensor)")
        emb = state["speaker_wavs"]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise ConfigError(f"a voice embedding must have shape [1, dim, frames], got {tuple(emb.shape)}")
    return emb


class ItemStepper:
    """What `TtsStepper` and `delayed.DelayedStepper` share: a batch of items stepped together, some frozen, each
    restartable. Subclasses set `states`, `steps`, `gen`, `_active`, `_user`, `_silent` and `_silent_steps` (the
    steps of an item whose audio is still all initial tokens)."""

    states: list[ForcingState]
    steps: list[int]
    gen: Generator
    _active: list[bool]
    _user: torch.Tensor | None
    _silent: torch.Tensor
    _silent_steps: int

    def _restart_sampling(self, i: int, temp: float, seed: int | None, top_k: int) -> None:
        """Item i's streams reset, with its own temperature, seed and audio top-k (the text's is at most 25)."""
        mask = torch.zeros(len(self.states), dtype=torch.bool)
        mask[i] = True
        self.gen.reset(mask)
        self.gen.configure_slot(i, temp=temp, top_k=top_k, temp_text=temp, top_k_text=min(top_k, TEXT_TOP_K),
                                text_seed=seed, audio_seed=None if seed is None else (seed + 1) % 2**64)

    @torch.no_grad()
    def step(self, active: list[bool] | None = None) -> torch.Tensor | None:
        """One step of the `active` items (all when None): None for the first steps, then long
        [B, 1 + dep_q, 1] (see Generator.step; -2 for frozen items and those restarted too recently)."""
        batch = len(self.states)
        active = [True] * batch if active is None else list(active)
        partial = not all(active)
        if partial or not all(self._active):
            self.gen.set_active(torch.tensor(active) if partial else None)
        self._active = active
        silent = [a and s < self._silent_steps for a, s in zip(active, self.steps)]
        if not any(silent):
            frame = self.gen.step(self._user)
        elif all(d or not a for d, a in zip(silent, active)):  # every stepped item is still silent
            frame = self.gen.step(self._user, replace_audio=self._silent)
        else:
            frame = self.gen.step(self._user, replace_audio=self._silent, replace_rows=silent)
        for i, a in enumerate(active):
            self.steps[i] += a
        return frame

    @property
    def finished(self) -> bool:
        return all(self.item_finished(i) for i in range(len(self.states)))

    def item_finished(self, i: int) -> bool:
        raise NotImplementedError


def run_stepper(stepper: ItemStepper, max_steps: int, dep_q: int,
                on_step: tp.Callable[[int], None] | None = None) -> TtsRun:
    """Step every item until all are finished or `max_steps`: frames [B, 1 + dep_q, F], ends and transcripts."""
    frames = []
    batch = len(stepper.states)
    with stepper.gen.streaming(batch):
        for step in range(max_steps):
            if stepper.finished:
                break
            frame = stepper.step()
            if frame is not None:
                frames.append(frame)
            if on_step is not None:
                on_step(step + 1)
    out = torch.cat(frames, dim=2) if frames else torch.zeros(batch, 1 + dep_q, 0, dtype=torch.long)
    return TtsRun(out, [s.end_step for s in stepper.states], [s.transcript for s in stepper.states])


class TtsStepper(ItemStepper):
    """The generation loop of `Synthesizer.generate`, one step at a time (inside `stepper.gen.streaming(B)`).

    Words may be appended to `states[i].words` between steps (streaming text); `step(active)` advances only some
    items (the others are frozen), and `restart` gives an item new words, conditions and sampling (a server
    session): each item's tokens are those of a run of its own.
    """

    def __init__(self, synth: Synthesizer, scripts: list[list[Word]], voices: list[TensorInput | None] | None = None,
                 prefixes: list[torch.Tensor] | None = None) -> None:
        self.synth = synth
        lm, cfg = synth.bundle.lm, synth.bundle.config
        batch = len(scripts)
        voices = voices or [None] * batch
        conditions, guidance = synth.conditions(voices)
        self.states = [synth.forcer.start(words) for words in scripts]
        self.delay = delay = synth.settings.delay_steps
        t = synth.tokens
        text_prefix: list[deque] = [deque() for _ in range(batch)]
        audio_prefix: list[deque] = [deque() for _ in range(batch)]
        masked_until = None
        if prefixes is not None:
            masked_until = []
            for i, prefix in enumerate(prefixes):
                if prefix.shape[0] != cfg.num_codebooks:
                    raise ConfigError(f"an audio prompt needs {cfg.num_codebooks} streams, got {prefix.shape[0]}")
                masked_until.append(prefix.shape[-1] + delay)
                text_prefix[i].extend(prefix[0].tolist())
                delays = [d + delay for d in cfg.delays[1:]]
                grid = torch.full((cfg.n_q, prefix.shape[-1] + max(delays)), -2, dtype=torch.long)
                for k, d in enumerate(delays):
                    grid[k, d:d + prefix.shape[-1]] = prefix[1 + k]
                audio_prefix[i].extend(grid.t().to(lm.device))
        self.steps = [0] * batch  # steps of each item since its start
        self._active = [True] * batch
        self._text_prefix, self._audio_prefix = text_prefix, audio_prefix

        def on_logits(logits: torch.Tensor) -> torch.Tensor | None:
            if not synth.padding_bonus:
                return None
            logits = logits.clone()
            logits[:, t.pad] += synth.padding_bonus
            return logits

        def on_text(sampled: torch.Tensor) -> torch.Tensor:
            out = []
            for i, token in enumerate(sampled.tolist()):
                if not self._active[i]:  # frozen: its result is dropped
                    out.append(token)
                    continue
                out.append(text_prefix[i].popleft() if text_prefix[i]
                           else synth.forcer.step(self.steps[i], self.states[i], token))
            return torch.tensor(out, dtype=torch.long, device=sampled.device)

        def on_audio(audio: torch.Tensor) -> torch.Tensor:
            audio = audio.clone()
            for i, steps in enumerate(self.steps):
                for q in range(audio.shape[1]):
                    if steps < cfg.delays[1 + q] + delay:
                        audio[i, q] = -1
            for i, queue in enumerate(audio_prefix):
                if queue:
                    forced = queue.popleft()
                    audio[i] = torch.where(forced != -2, forced, audio[i])
            return audio

        self.gen = Generator(lm, temp=synth.temp, temp_text=synth.temp, top_k=synth.top_k,
                             top_k_text=min(synth.top_k, TEXT_TOP_K), seed=synth.seed,
                             text_logits_hook=on_logits, text_hook=on_text, audio_hook=on_audio,
                             conditions=conditions, cfg_coef=guidance, cfg_null_text=True,
                             cfg_masked_until=masked_until)
        self._silent = torch.full((batch, cfg.dep_q), -1, dtype=torch.long, device=lm.device)
        self._silent_steps = delay
        self._user = torch.full((batch, cfg.n_user, 1), -1, dtype=torch.long, device=lm.device) \
            if cfg.n_user else None

    @property
    def step_idx(self) -> int:
        """Steps of the first item (the only one of a single stream)."""
        return self.steps[0]

    def item_finished(self, i: int) -> bool:
        """Asked for a word past its last one, and its audio has caught up (+ final padding)."""
        end = self.states[i].end_step
        return end is not None and self.steps[i] >= end + self.delay + self.synth.final_padding

    def restart(self, i: int, conditions: dict, temp: float, seed: int | None, top_k: int = 250) -> None:
        """Item i starts anew (no words yet) with its own conditions (one item's, from `Synthesizer.conditions`),
        temperature, seed and audio top-k (the text's top-k is at most 25)."""
        self.states[i] = self.synth.forcer.start([])
        self.steps[i] = 0
        self._text_prefix[i].clear()
        self._audio_prefix[i].clear()
        self._restart_sampling(i, temp, seed, top_k)
        self.gen.set_conditions(i, conditions)


class Synthesizer:
    """TTS over a `tts` bundle: scripts in, frames (and audio) out, batched."""

    def __init__(self, bundle: MoshiBundle, temp: float = 0.6, cfg_coef: float = 1.0, padding_bonus: float = 0.0,
                 max_padding: int = 8, initial_padding: int = 2, final_padding: int = 4,
                 max_steps: int = 30_000, seed: int | None = None, top_k: int = 250) -> None:
        if bundle.config.model_type != "tts":
            raise ConfigError(f"speech synthesis needs a 'tts' model, this one is {bundle.config.model_type!r}")
        if bundle.lm.condition_provider is None:
            raise ConfigError("this tts model has no conditioners (config.json `conditioners`)")
        self.bundle = bundle
        self.settings = TtsSettings.from_bundle(bundle)
        self.tokens = TtsTokens(bundle.config.text_card + 1)
        self.forcer = TextForcer(self.tokens, self.settings.second_stream_ahead, max_padding, initial_padding)
        self.temp, self.cfg_coef, self.padding_bonus, self.top_k = temp, cfg_coef, padding_bonus, top_k
        self.final_padding, self.max_steps, self.seed = final_padding, max_steps, seed
        conditioners = bundle.lm.condition_provider.conditioners
        self.multi_speaker = "speaker_wavs" in conditioners
        cfg_lut = conditioners["cfg"] if "cfg" in conditioners else None  # noqa: SIM401 (a ModuleDict)
        self.distilled_cfg = sorted(float(v) for v in cfg_lut.possible_values or []) \
            if isinstance(cfg_lut, LUTConditioner) else []

    def words(self, text: str | tp.Sequence[str], padding_between: int = 1) -> list[Word]:
        turns = [text] if isinstance(text, str) else list(text)
        return script_to_words(self.bundle.tokenizer, self.tokens, self.bundle.mimi.frame_rate, turns,
                               self.multi_speaker, padding_between)

    def stream_words(self, text: str, first: bool) -> list[Word]:
        """The words of one piece of streamed text; the first piece carries the main speaker's token."""
        return script_to_words(self.bundle.tokenizer, self.tokens, self.bundle.mimi.frame_rate, [text],
                               self.multi_speaker and first, padding_between=1)

    def stepper(self, scripts: list[list[Word]], voices: list[TensorInput | None] | None = None) -> TtsStepper:
        return TtsStepper(self, scripts, voices)

    def speech_output(self):
        """What one item's returned frames become (`tts_stream.SpeechOutput`)."""
        from .tts_stream import SpeechOutput
        return SpeechOutput(self.settings.delay_steps, self.bundle.mimi.frame_rate)

    def conditions(self, voices: list[TensorInput | None]) -> tuple[dict, float]:
        """Embedded conditions for a batch (with CFG's null rows when guidance runs) and the guidance to run."""
        provider = self.bundle.lm.condition_provider
        names = provider.conditioners
        batch = len(voices)
        guidance = self.cfg_coef
        text: dict[str, list] = {}
        if "control" in names:
            text["control"] = ["ok"] * batch
        if "cfg" in names:
            if self.distilled_cfg:
                if self.cfg_coef not in self.distilled_cfg:
                    raise ConfigError(f"this model was distilled for guidance values {self.distilled_cfg}; "
                                      f"got --cfg-coef {self.cfg_coef}")
                text["cfg"] = [format(self.cfg_coef, ".1f")] * batch
                guidance = 1.0  # the model applies it itself
            else:
                text["cfg"] = [None] * batch
        tensors = {}
        if self.multi_speaker:
            if any(v is None for v in voices):
                raise ConfigError("this model needs a voice (--voice FILE.safetensors, a voice embedding)")
            width = max(v.tensor.shape[1] for v in voices)
            dim = voices[0].tensor.shape[2]
            tensor = torch.zeros(batch, width, dim)
            mask = torch.zeros(batch, width, dtype=torch.bool)
            for i, v in enumerate(voices):
                tensor[i, :v.tensor.shape[1]] = v.tensor[0]
                mask[i, :v.mask.shape[1]] = v.mask[0]
            tensors["speaker_wavs"] = TensorInput(tensor, mask)
        if guidance != 1.0:  # null rows: every condition absent
            text = {k: v + [None] * batch for k, v in text.items()}
            tensors = {k: TensorInput(torch.cat([v.tensor, torch.zeros_like(v.tensor)]),
                                      torch.cat([v.mask, torch.zeros_like(v.mask)])) for k, v in tensors.items()}
        for name, module in names.items():
            if name not in text and isinstance(module, LUTConditioner):
                text[name] = [None] * (batch * (2 if guidance != 1.0 else 1))
        with torch.no_grad():
            return provider(text=text, tensors=tensors), guidance

    @torch.no_grad()
    def generate(self, scripts: list[list[Word]], voices: list[TensorInput | None] | None = None,
                 prefixes: list[torch.Tensor] | None = None,
                 on_step: tp.Callable[[int], None] | None = None) -> TtsRun:
        """Run the model over a batch of scripts. prefixes: per item, codes [1 + n_q, T] of an audio prompt
        (text row -1) forced at the start."""
        return run_stepper(TtsStepper(self, scripts, voices, prefixes), self.max_steps, self.bundle.config.dep_q,
                           on_step)

    def speak(self, texts: list[str | tp.Sequence[str]], voices: list[TensorInput | None] | None = None,
              prefixes: list[torch.Tensor] | None = None,
              on_step: tp.Callable[[int], None] | None = None) -> list[Speech]:
        """Synthesize a batch of texts to audio with word timings."""
        run = self.generate([self.words(text) for text in texts], voices, prefixes, on_step)
        mimi = self.bundle.mimi
        rate = mimi.frame_rate
        delay = self.settings.delay_steps
        # The audio of text step s is frame s + delay; as Kyutai, the first two decoded frames are dropped
        # (a click at the start), so text step s sounds at output frame s - 2.
        codes = run.frames[:, 1:, delay:].clamp(min=0)
        pcm = []
        with torch.no_grad(), mimi.streaming(codes.shape[0]):
            for i in range(codes.shape[-1]):
                pcm.append(mimi.decode(codes[..., i:i + 1]).clamp(-1, 1).cpu())
        frame = mimi.frame_size
        audio = torch.cat(pcm, dim=-1)[..., 2 * frame:] if pcm else torch.zeros(codes.shape[0], 1, 0)
        out = []
        for i, end in enumerate(run.end_steps):
            start = 0 if prefixes is None else prefixes[i].shape[-1]
            stop = min(end if end is not None else run.frames.shape[-1], audio.shape[-1] // frame)
            wav = audio[i, :, start * frame:max(stop, start) * frame]
            steps = run.transcripts[i]
            words = []
            for j, (word, s) in enumerate(steps):
                begin = max((s - 2 - start) / rate, 0.0)
                finish = ((steps[j + 1][1] - 2) if j + 1 < len(steps) else stop) - start
                finish = min(finish, max(stop - start, 0)) / rate
                words.append(SpokenWord(word, round(begin, 3), round(max(finish, begin), 3)))
            out.append(Speech(wav, words, end is not None))
        return out
