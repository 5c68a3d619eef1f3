"""Turn-taking: where each synthesized clause lands on the two-speaker timeline.

Events, as in the conversation-analysis terms the Moshi paper uses (its Table 9, after dGSLM):
- gap: silence between one speaker's turn and the other's next turn;
- overlap: the next speaker starts before the current one has finished (a smooth overlapping hand-over);
- pause: silence between two clauses of the same speaker;
- interruption: the listener barges in mid-turn; the speaker goes on for a reaction time, finishes the word in
  progress and stops, dropping the rest of the turn (its transcript ends there too);
- backchannel: the listener says "mhm"/"yeah" during the speaker's turn without taking the floor.

Every duration is a lognormal with a given mean and standard deviation, clipped to [low, high].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ...errors import ConfigError
from .engines import Speech
from .scripts import MOSHI, USER


@dataclass
class Duration:
    """Lognormal seconds with mean `mean` and standard deviation `std`, clipped to [low, high]."""

    mean: float
    std: float
    low: float = 0.0
    high: float = 10.0

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.std >= 0 and 0 <= self.low <= self.high):
            raise ConfigError(f"bad duration distribution {self}: need mean > 0, std >= 0, 0 <= low <= high")

    def sample(self, rng: np.random.Generator, size: int | None = None):
        sigma2 = math.log(1 + (self.std / self.mean) ** 2)
        mu = math.log(self.mean) - sigma2 / 2
        return np.clip(rng.lognormal(mu, math.sqrt(sigma2), size), self.low, self.high)


@dataclass
class TurnTaking:
    """Turn-taking distributions, in seconds. Defaults are our choice, near published telephone-conversation
    (Fisher / Switchboard) figures: gaps around 0.4-0.5 s, overlaps about a quarter of hand-overs and 0.3-0.4 s
    long, pauses of about half a second between one speaker's phrases."""

    lead_in: Duration = field(default_factory=lambda: Duration(0.6, 0.4, 0.1, 2.0))
    tail: Duration = field(default_factory=lambda: Duration(0.8, 0.4, 0.2, 2.0))
    gap: Duration = field(default_factory=lambda: Duration(0.45, 0.35, 0.05, 2.5))
    overlap_prob: float = 0.25
    overlap: Duration = field(default_factory=lambda: Duration(0.35, 0.25, 0.05, 1.2))
    pause: Duration = field(default_factory=lambda: Duration(0.55, 0.3, 0.2, 2.0))  # after . ! ? ;
    comma_pause: Duration = field(default_factory=lambda: Duration(0.15, 0.08, 0.03, 0.4))  # after , :
    user_interrupt_prob: float = 0.15  # per Moshi turn long enough to interrupt
    moshi_interrupt_prob: float = 0.05  # per user turn long enough to interrupt
    interrupt_min_turn: float = 1.5  # seconds of speech a turn needs before it can be interrupted
    reaction: Duration = field(default_factory=lambda: Duration(0.4, 0.2, 0.15, 1.0))
    backchannel_prob: float = 0.35  # per turn of at least `backchannel_min_turn` seconds
    backchannel_min_turn: float = 2.0
    backchannels: tuple[str, ...] = ("mhm", "yeah", "right", "okay", "uh-huh", "I see")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(obj: dict) -> TurnTaking:
        known = {f.name: f for f in fields(TurnTaking)}
        unknown = set(obj) - set(known)
        if unknown:
            raise ConfigError(f"unknown turn-taking settings {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {}
        for name, value in obj.items():
            if isinstance(getattr(TurnTaking(), name), Duration):
                kwargs[name] = Duration(**value) if isinstance(value, dict) else Duration(*value)
            elif name == "backchannels":
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = float(value)
        for name in ("overlap_prob", "user_interrupt_prob", "moshi_interrupt_prob", "backchannel_prob"):
            p = kwargs.get(name, 0.0)
            if not 0 <= p <= 1:
                raise ConfigError(f"turn-taking {name} must be a probability in [0, 1], not {p}")
        return TurnTaking(**kwargs)


@dataclass
class Segment:
    """One clause on the timeline: who, where (in samples at 24 kHz), what (audio and words relative to it)."""

    speaker: str
    start: int  # sample
    speech: Speech
    kind: str = "speech"  # or "backchannel"

    @property
    def end(self) -> int:
        return self.start + len(self.speech.audio)


@dataclass
class PlannedTurn:
    speaker: str
    chunks: list[Speech]
    breaks: list[str]  # punctuation ending each chunk but the last: "sentence" or "comma"


def _sec(x: float) -> int:
    return round(x * 24_000)


def _truncate(speech: Speech, word_index: int) -> Speech:
    """Keep words [0, word_index] and the audio up to the end of that word, with a 5 ms fade-out."""
    end = _sec(speech.words[word_index][2])
    audio = speech.audio[:end].copy()
    fade = min(120, len(audio))
    audio[len(audio) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return Speech(audio, speech.words[:word_index + 1])


def plan(turns: list[PlannedTurn], backchannels: dict[str, list[Speech]], cfg: TurnTaking,
         rng: np.random.Generator) -> tuple[list[Segment], int, dict[str, int]]:
    """Lay out the turns; returns the segments, the total length in samples, and counts of each event."""
    segments: list[Segment] = []
    last_end = {MOSHI: 0, USER: 0}  # each speaker's last sample of speech: a channel never overlaps itself
    counts = {"gap": 0, "overlap": 0, "interruption": 0, "backchannel": 0, "pause": 0}
    prev: list[int] = []  # indices in `segments` of the previous turn
    for n, turn in enumerate(turns):
        me = turn.speaker
        other = USER if me == MOSHI else MOSHI
        if n == 0:
            start = _sec(float(cfg.lead_in.sample(rng)))
        else:
            prev_speaker = segments[prev[0]].speaker
            prev_end = segments[prev[-1]].end
            if prev_speaker == me:
                start = prev_end + _sec(float(cfg.pause.sample(rng)))
                counts["pause"] += 1
            else:
                start = _handover(segments, prev, me, last_end, cfg, rng, counts)
                if start is None:
                    start = prev_end + _sec(float(cfg.gap.sample(rng)))
                    counts["gap"] += 1
                # the previous turn may have been cut: speakers' last samples follow the segments
                last_end[other] = max((s.end for s in segments if s.speaker == other), default=0)
        start = max(start, last_end[me] + _sec(0.05))
        placed = []
        t = start
        for k, chunk in enumerate(turn.chunks):
            segments.append(Segment(me, t, chunk))
            placed.append(len(segments) - 1)
            t += len(chunk.audio)
            if k < len(turn.chunks) - 1:
                dist = cfg.pause if turn.breaks[k] == "sentence" else cfg.comma_pause
                t += _sec(float(dist.sample(rng)))
        last_end[me] = segments[placed[-1]].end
        _maybe_backchannel(segments, placed, other, backchannels.get(other, []), last_end, cfg, rng, counts)
        prev = placed
    total = max(s.end for s in segments) + _sec(float(cfg.tail.sample(rng)))
    return segments, total, counts


def _handover(segments: list[Segment], prev: list[int], me: str, last_end: dict[str, int], cfg: TurnTaking,
              rng: np.random.Generator, counts: dict[str, int]) -> int | None:
    """Start of my turn after the other speaker's turn `prev`: an interruption or an overlap (None: a gap)."""
    first, last = segments[prev[0]], segments[prev[-1]]
    p_interrupt = cfg.user_interrupt_prob if me == USER else cfg.moshi_interrupt_prob
    speech_len = sum(len(segments[i].speech.audio) for i in prev)
    if speech_len >= _sec(cfg.interrupt_min_turn) and rng.random() < p_interrupt:
        earliest = max(first.start + _sec(first.speech.words[0][2]), last_end[me] + _sec(0.1))
        latest = last.end - _sec(0.5)
        if earliest < latest:
            barge = int(rng.integers(earliest, latest))
            stop = barge + _sec(float(cfg.reaction.sample(rng)))
            if _cut_after(segments, prev, stop):
                counts["interruption"] += 1
                return barge
    if rng.random() < cfg.overlap_prob:
        overlap = _sec(float(cfg.overlap.sample(rng)))
        start = last.end - min(overlap, int(0.8 * len(last.speech.audio)))
        if start > last_end[me] + _sec(0.05):
            counts["overlap"] += 1
            return start
    return None


def _cut_after(segments: list[Segment], prev: list[int], stop: int) -> bool:
    """Cut the turn `prev` at the end of the word in progress at sample `stop`; False if that is its last word."""
    for pos, i in enumerate(prev):
        seg = segments[i]
        for w, (_, _, end) in enumerate(seg.speech.words):
            if seg.start + _sec(end) >= stop:
                if pos == len(prev) - 1 and w == len(seg.speech.words) - 1:
                    return False
                seg.speech = _truncate(seg.speech, w)
                for j in sorted(prev[pos + 1:], reverse=True):
                    del segments[j]
                del prev[pos + 1:]
                return True
        if pos + 1 < len(prev) and segments[prev[pos + 1]].start >= stop:
            # the speaker was pausing when the other barged in: the turn ends with this clause
            for j in sorted(prev[pos + 1:], reverse=True):
                del segments[j]
            del prev[pos + 1:]
            return True
    return False


def _maybe_backchannel(segments: list[Segment], placed: list[int], listener: str, options: list[Speech],
                       last_end: dict[str, int], cfg: TurnTaking, rng: np.random.Generator,
                       counts: dict[str, int]) -> None:
    """The listener says "mhm" in one of the speaker's pauses, or over the speech, without taking the floor."""
    turn_start, turn_end = segments[placed[0]].start, segments[placed[-1]].end
    if not options or turn_end - turn_start < _sec(cfg.backchannel_min_turn) or rng.random() >= cfg.backchannel_prob:
        return
    bc = options[int(rng.integers(len(options)))]
    pauses = [segments[placed[k]].end for k in range(len(placed) - 1)
              if segments[placed[k + 1]].start - segments[placed[k]].end >= _sec(0.3)]
    if pauses and rng.random() < 0.6:
        start = int(pauses[int(rng.integers(len(pauses)))]) + _sec(float(rng.uniform(0.05, 0.2)))
    else:
        start = int(rng.integers(turn_start + _sec(0.8), max(turn_start + _sec(0.8) + 1, turn_end - _sec(0.6))))
    if start < last_end[listener] + _sec(0.3) or start + len(bc.audio) > turn_end:
        return
    segments.append(Segment(listener, start, bc, kind="backchannel"))
    last_end[listener] = start + len(bc.audio)
    counts["backchannel"] += 1
