"""Synthetic dialogue sets: plan, synthesize, lay out, render and write each dialogue; resumable and parallel.

Everything about dialogue `i` (split, script, user voice, timing) comes from generators seeded with
`(seed, i, purpose)`, so a dialogue is the same bytes whichever worker makes it, in whatever order, in a fresh
run or a resumed one. A dialogue is finished when its `NAME.json` exists (written after its wav, both through a
rename); a rerun skips finished dialogues and the manifests are rewritten at the end from what is on disk.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..format import atomic_write_bytes, atomic_write_json, write_alignments, write_manifest
from .engines import Speech, Voice, synthesize
from .mixing import render, wav_bytes, words_of
from .scripts import MOSHI, TOPICS, USER, Dialogue, chunk_text, generate_dialogue, load_jsonl_dialogues
from .turns import PlannedTurn, TurnTaking, plan
from .voices import ESPEAK_ACCENTS, MOSHI_VOICE, SPLITS, VoiceBank, make_voice_bank

logger = logging.getLogger(__name__)

_CONFIG_FILE = "synth_config.json"


@dataclass
class SynthConfig:
    """What a synthetic set is made of. `dialogues` may grow between runs; everything else must not change."""

    dialogues: int
    seed: int = 0
    topics: tuple[str, ...] = tuple(TOPICS)
    script_file: str | None = None  # JSONL dialogues instead of the built-in topics
    user_voices: int = 48
    moshi_voice: str = MOSHI_VOICE
    engines: tuple[str, ...] = ("espeak", "festival")
    accents: tuple[str, ...] = ESPEAK_ACCENTS  # espeak-ng voices (languages/accents) user voices come from
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    level_db: float = -20.0
    exchanges: tuple[int, int] = (2, 5)
    turn_taking: TurnTaking = field(default_factory=TurnTaking)

    def __post_init__(self) -> None:
        if self.dialogues < 1:
            raise ConfigError("--dialogues must be at least 1")
        unknown = set(self.topics) - set(TOPICS)
        if unknown or not self.topics:
            raise ConfigError(f"unknown topics {sorted(unknown)}; choose from {sorted(TOPICS)}")
        if not (0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1
                and self.valid_fraction + self.test_fraction < 1):
            raise ConfigError("valid and test fractions must be in [0, 1) and leave room for training")
        if not self.accents:
            raise ConfigError("give at least one espeak-ng accent or language for user voices")
        if not self.engines or set(self.engines) - {"espeak", "festival"}:
            raise ConfigError(f"engines must be espeak and/or festival, not {self.engines}")
        Voice.parse(self.moshi_voice)
        if not 1 <= self.exchanges[0] <= self.exchanges[1]:
            raise ConfigError(f"exchanges {self.exchanges}: need 1 <= MIN <= MAX")
        self.exchanges = (int(self.exchanges[0]), int(self.exchanges[1]))

    @property
    def fractions(self) -> dict[str, float]:
        return {"train": 1 - self.valid_fraction - self.test_fraction, "valid": self.valid_fraction,
                "test": self.test_fraction}

    def identity(self) -> dict:
        """Everything that decides a dialogue's bytes (not how many dialogues there are)."""
        d = asdict(self)
        d.pop("dialogues")
        return json.loads(json.dumps(d))


def _rng(cfg: SynthConfig, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, index, purpose])


def dialogue_split(cfg: SynthConfig, index: int, pinned: str | None = None) -> str:
    if pinned:
        return pinned
    u = _rng(cfg, index, 1).random()
    if u < cfg.test_fraction:
        return "test"
    return "valid" if u < cfg.test_fraction + cfg.valid_fraction else "train"


def dialogue_name(split: str, index: int) -> str:
    return f"{split}/dialogue_{index:06d}"


class DialogueMaker:
    """Makes one dialogue at a time; holds the synthesizer and, for JSONL sources, the scripts."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.bank: VoiceBank = make_voice_bank(cfg.user_voices, cfg.seed, cfg.fractions, cfg.moshi_voice,
                                               cfg.engines, cfg.accents)
        self.scripts = load_jsonl_dialogues(Path(cfg.script_file)) if cfg.script_file else None
        try:
            import scipy.signal  # noqa: F401  (slow first import: once here, before workers fork)
        except ImportError as exc:
            raise ConfigError("data synth resamples with scipy: pip install scipy (or openmoshi[data])") from exc

    def script(self, index: int) -> tuple[str, Dialogue]:
        if self.scripts is not None:
            dialogue = self.scripts[index % len(self.scripts)]
            return dialogue_split(self.cfg, index, dialogue.split), dialogue
        split = dialogue_split(self.cfg, index)
        return split, generate_dialogue(_rng(self.cfg, index, 2), split, list(self.cfg.topics),
                                        self.cfg.fractions, self.cfg.exchanges)

    def user_voice(self, index: int, split: str) -> Voice:
        voices = self.bank.users[split] or self.bank.users["train"]
        return voices[int(_rng(self.cfg, index, 3).integers(len(voices)))]

    def make(self, index: int, out_dir: Path) -> dict:
        split, dialogue = self.script(index)
        user_voice = self.user_voice(index, split)
        voices = {MOSHI: self.bank.moshi, USER: user_voice}
        # every clause of the dialogue in one call: one fresh synthesizer process per engine and voice
        per_turn = [chunk_text(t.text) for t in dialogue.turns]
        bc_words = [w.split() for w in self.cfg.turn_taking.backchannels]
        chunks = {who: [c for turn, cs in zip(dialogue.turns, per_turn) if turn.speaker == who for c in cs]
                  + bc_words for who in (MOSHI, USER)}
        results = synthesize([(c, voices[who]) for who in (MOSHI, USER) for c in chunks[who]])
        speech: dict[str, list[Speech]] = {MOSHI: results[:len(chunks[MOSHI])], USER: results[len(chunks[MOSHI]):]}
        taken = {MOSHI: 0, USER: 0}
        turns = []
        for turn, cs in zip(dialogue.turns, per_turn):
            if not cs:
                continue
            got = speech[turn.speaker][taken[turn.speaker]:taken[turn.speaker] + len(cs)]
            taken[turn.speaker] += len(cs)
            breaks = ["comma" if c[-1][-1:] in ",:" else "sentence" for c in cs[:-1]]
            turns.append(PlannedTurn(turn.speaker, got, breaks))
        backchannels = {who: speech[who][len(speech[who]) - len(bc_words):] for who in (MOSHI, USER)}
        segments, total, events = plan(turns, backchannels, self.cfg.turn_taking, _rng(self.cfg, index, 4))
        stereo = render(segments, total, self.cfg.level_db)
        name = dialogue_name(split, index)
        wav_path = out_dir / f"{name}.wav"
        wav_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(wav_path, wav_bytes(stereo))
        duration = total / 24_000
        meta = {"index": index, "split": split, "duration": round(duration, 4), "topics": dialogue.topics,
                "voices": {"moshi": voices[MOSHI].key, "user": user_voice.key}, "events": events}
        write_alignments(out_dir / f"{name}.json", words_of(segments), extra={"meta": meta})
        return meta


_MAKER: DialogueMaker | None = None


def _worker_init(cfg: SynthConfig) -> None:
    global _MAKER
    _MAKER = DialogueMaker(cfg)


def _worker_make(job: tuple[int, str]) -> dict:
    assert _MAKER is not None
    return _MAKER.make(job[0], Path(job[1]))


def _done(out_dir: Path, cfg: SynthConfig, index: int, split: str) -> bool:
    return (out_dir / f"{dialogue_name(split, index)}.json").is_file()


def synthesize_dataset(out_dir: Path, cfg: SynthConfig, workers: int = 1,
                       progress: Callable[[int, int], object] | None = None) -> dict:
    """Make dialogues 0..cfg.dialogues-1 under `out_dir` (skipping finished ones) and write the manifests
    `train.jsonl`, `valid.jsonl`, `test.jsonl`. Returns a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / _CONFIG_FILE
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        if previous != cfg.identity():
            changed = sorted(k for k in set(previous) | set(cfg.identity())
                             if previous.get(k) != cfg.identity().get(k))
            raise ConfigError(f"{out_dir} holds a set made with other settings ({', '.join(changed)}); "
                              "use the same settings to resume or extend it, or another --out folder")
    else:
        atomic_write_json(config_path, cfg.identity())
    for stale in out_dir.rglob(".*.tmp*"):  # half-written files of a killed run
        stale.unlink(missing_ok=True)
    maker = DialogueMaker(cfg)  # validates voices and scripts before any worker starts
    splits = {i: maker.script(i)[0] for i in range(cfg.dialogues)}
    todo = [i for i in range(cfg.dialogues) if not _done(out_dir, cfg, i, splits[i])]
    skipped = cfg.dialogues - len(todo)
    if skipped:
        logger.info("resuming: %d of %d dialogues already made", skipped, cfg.dialogues)
    done = skipped
    if progress:
        progress(done, cfg.dialogues)
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            maker.make(i, out_dir)
            done += 1
            if progress:
                progress(done, cfg.dialogues)
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers, _worker_init, (cfg,)) as pool:
            for _ in pool.imap_unordered(_worker_make, [(i, str(out_dir)) for i in todo]):
                done += 1
                if progress:
                    progress(done, cfg.dialogues)
    return write_manifests(out_dir, cfg, splits)


def write_manifests(out_dir: Path, cfg: SynthConfig, splits: dict[int, str]) -> dict:
    summary: dict = {"dialogues": {}, "hours": {}, "user_voices": {}}
    for split in SPLITS:
        entries, voices = [], set()
        for i in sorted(k for k, s in splits.items() if s == split):
            name = dialogue_name(split, i)
            meta = json.loads((out_dir / f"{name}.json").read_text())["meta"]
            entries.append((f"{name}.wav", meta["duration"]))
            voices.add(meta["voices"]["user"])
        write_manifest(out_dir / f"{split}.jsonl", entries)
        summary["dialogues"][split] = len(entries)
        summary["hours"][split] = round(sum(d for _, d in entries) / 3600, 4)
        summary["user_voices"][split] = len(voices)
    return summary


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
