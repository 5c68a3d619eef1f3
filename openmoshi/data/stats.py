"""Statistics of a dialogue data set: size, voices, speaking rate, text-stream padding, turn-taking.

Turn-taking follows the definitions the Moshi paper uses for its Table 9 (after dGSLM, Nguyen et al. 2022),
computed from word alignments:
- IPU (inter-pausal unit): a stretch of one speaker's words with no silence of `ipu_silence` (0.2 s) or more;
- pause: silence between two IPUs of the same speaker while the other is silent too;
- gap: silence between an IPU of one speaker and the next IPU of the other (credited to the one who starts);
- overlap: time when both speak (credited to the speaker who started while the other was talking).

Table 9 (and dGSLM's table) gives, per event kind, the number of events per minute of dialogue and their
cumulated duration per minute (seconds per minute); `summary()` reports both (the `all` column adds the two
speakers), beside mean and median durations. A reference (e.g. Fisher's figures) can be read from a JSON file
(`read_reference`) to print side by side; none is built in: the figures could not be read from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OpenMoshiError
from .format import SPEAKER_MAIN, Word, read_alignments, read_manifest

FRAME_RATE = 12.5  # text-stream frames per second (Mimi)
IPU_SILENCE = 0.2
EVENTS = ("ipu", "pause", "gap", "overlap")


@dataclass
class TurnTakingEvents:
    """Durations in seconds of each event kind, per speaker label."""

    durations: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, kind: str, speaker: str, seconds: float) -> None:
        self.durations.setdefault(kind, {}).setdefault(speaker, []).append(seconds)

    def extend(self, other: TurnTakingEvents) -> None:
        for kind, per in other.durations.items():
            for speaker, values in per.items():
                self.durations.setdefault(kind, {}).setdefault(speaker, []).extend(values)

    def values(self, kind: str, speaker: str | None = None) -> list[float]:
        per = self.durations.get(kind, {})
        return list(per.get(speaker, [])) if speaker else [v for vs in per.values() for v in vs]


def ipus(words: Sequence[Word], silence: float = IPU_SILENCE) -> list[tuple[float, float]]:
    """Merge one speaker's words into IPUs: consecutive words closer than `silence` seconds."""
    out: list[list[float]] = []
    for w in sorted(words, key=lambda w: w.start):
        if w.end <= w.start:
            continue
        if out and w.start - out[-1][1] < silence:
            out[-1][1] = max(out[-1][1], w.end)
        else:
            out.append([w.start, w.end])
    return [(a, b) for a, b in out]


def turn_taking(words: Sequence[Word], silence: float = IPU_SILENCE) -> TurnTakingEvents:
    """IPUs, pauses, gaps and overlaps of one dialogue, per speaker."""
    events = TurnTakingEvents()
    speakers = sorted({w.speaker for w in words})
    units = {s: ipus([w for w in words if w.speaker == s], silence) for s in speakers}
    for s, us in units.items():
        for a, b in us:
            events.add("ipu", s, b - a)
    # overlaps: intersections of two speakers' IPUs, credited to the one whose IPU started later
    for i, s1 in enumerate(speakers):
        for s2 in speakers[i + 1:]:
            for a1, b1 in units[s1]:
                for a2, b2 in units[s2]:
                    lo, hi = max(a1, a2), min(b1, b2)
                    if hi > lo:
                        events.add("overlap", s2 if a2 >= a1 else s1, hi - lo)
    # silences: holes in the union of everyone's IPUs; who spoke last before and who speaks first after
    tagged = sorted((a, b, s) for s, us in units.items() for a, b in us)
    reach, last_speaker = -math.inf, None
    for a, b, s in tagged:
        if a > reach and last_speaker is not None:
            events.add("pause" if s == last_speaker else "gap", s, a - reach)
        if b >= reach:
            reach, last_speaker = b, s
    return events


def pad_fraction(words: Sequence[Word], duration: float, speaker: str = SPEAKER_MAIN) -> float:
    """Share of the 12.5 Hz text-stream frames that no word of `speaker` covers (frames that will hold PAD)."""
    frames = max(1, math.ceil(duration * FRAME_RATE))
    covered = np.zeros(frames, dtype=bool)
    for w in words:
        if w.speaker == speaker and w.end > w.start:
            covered[int(w.start * FRAME_RATE):min(frames, math.ceil(w.end * FRAME_RATE))] = True
    return 1.0 - float(covered.mean())


@dataclass
class DatasetStats:
    dialogues: int = 0
    hours: float = 0.0
    words: dict[str, int] = field(default_factory=dict)
    speech_seconds: dict[str, float] = field(default_factory=dict)
    voices: dict[str, set] = field(default_factory=dict)
    pad_frames: float = 0.0
    frames: float = 0.0
    events: TurnTakingEvents = field(default_factory=TurnTakingEvents)
    splits: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        minutes = self.hours * 60
        speakers = sorted(self.words)
        table = {}
        for kind in EVENTS:
            row = {}
            for who in [*speakers, "all"]:
                vals = np.array(self.events.values(kind, None if who == "all" else who))
                row[who] = {"count": len(vals), "per_minute": round(len(vals) / minutes, 3) if minutes else 0.0,
                            "seconds_per_minute": round(float(vals.sum()) / minutes, 3) if minutes else 0.0,
                            "mean": round(float(vals.mean()), 4) if len(vals) else None,
                            "median": round(float(np.median(vals)), 4) if len(vals) else None,
                            "total_share": round(float(vals.sum()) / (minutes * 60), 4) if minutes else 0.0}
            table[kind] = row
        return {
            "dialogues": self.dialogues, "hours": round(self.hours, 4), "splits": self.splits,
            "voices": {k: len(v) for k, v in sorted(self.voices.items())},
            "words": dict(sorted(self.words.items())),
            "words_per_minute": {s: round(n / minutes, 2) if minutes else 0.0 for s, n in sorted(self.words.items())},
            "words_per_minute_of_speech": {s: round(n / (self.speech_seconds[s] / 60), 2)
                                           if self.speech_seconds.get(s) else 0.0
                                           for s, n in sorted(self.words.items())},
            "text_pad_fraction": round(self.pad_frames / self.frames, 4) if self.frames else None,
            "turn_taking": table,
        }


def read_reference(path: Path) -> dict:
    """A reference table to print beside a data set's turn-taking: JSON
    `{"name": "...", "events": {"ipu": {"per_minute": x, "seconds_per_minute": y}, "pause": ..., ...}}`
    (event kinds and values optional; values are for both speakers together, as Table 9's)."""
    import json
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OpenMoshiError(f"{path}: cannot read the reference table: {exc}") from exc
    events = obj.get("events") if isinstance(obj, dict) else None
    if not isinstance(events, dict) or set(events) - set(EVENTS):
        raise OpenMoshiError(f"{path}: expected {{\"name\": ..., \"events\": {{kind: {{\"per_minute\": x, "
                             f"\"seconds_per_minute\": y}}}}}} with kinds among {list(EVENTS)}")
    table = {}
    for kind, row in events.items():
        if not isinstance(row, dict) or set(row) - {"per_minute", "seconds_per_minute"} or not all(
                isinstance(v, (int, float)) for v in row.values()):
            raise OpenMoshiError(f"{path}: {kind}: expected numbers per_minute and/or seconds_per_minute")
        table[kind] = {k: float(v) for k, v in row.items()}
    return {"name": str(obj.get("name", Path(path).stem)), "events": table}


def find_dialogues(root: Path) -> list[tuple[Path, float]]:
    """The (wav, duration) pairs of a data set: a manifest file, a folder of manifests, or else a folder of wavs
    with their .json (durations then read from the wav headers)."""
    root = Path(root)
    if root.is_file():
        return read_manifest(root)
    if not root.is_dir():
        raise OpenMoshiError(f"{root}: no such data set (give a folder or a .jsonl manifest)")
    manifests = sorted(root.glob("*.jsonl"))
    if manifests:
        return [item for m in manifests for item in read_manifest(m)]
    import soundfile
    wavs = sorted(p for p in root.rglob("*.wav") if p.with_suffix(".json").is_file())
    if not wavs:
        raise OpenMoshiError(f"{root}: no manifest (*.jsonl) and no wav files with a .json alignment beside them")
    return [(w, soundfile.info(str(w)).duration) for w in wavs]


def dataset_stats(root: Path, silence: float = IPU_SILENCE) -> DatasetStats:
    stats = DatasetStats()
    for wav, duration in find_dialogues(root):
        words = read_alignments(wav.with_suffix(".json"))
        add_dialogue(stats, words, duration, silence, meta=_meta(wav.with_suffix(".json")))
    return stats


def add_dialogue(stats: DatasetStats, words: Sequence[Word], duration: float, silence: float = IPU_SILENCE,
                 meta: dict | None = None) -> None:
    stats.dialogues += 1
    stats.hours += duration / 3600
    for w in words:
        stats.words[w.speaker] = stats.words.get(w.speaker, 0) + 1
    for s in {w.speaker for w in words}:
        stats.speech_seconds[s] = stats.speech_seconds.get(s, 0.0) + sum(
            b - a for a, b in ipus([w for w in words if w.speaker == s], silence))
    frames = max(1, math.ceil(duration * FRAME_RATE))
    stats.pad_frames += pad_fraction(words, duration) * frames
    stats.frames += frames
    stats.events.extend(turn_taking(words, silence))
    if meta:
        for role, key in meta.get("voices", {}).items():
            stats.voices.setdefault(role, set()).add(key)
        if "split" in meta:
            stats.splits[meta["split"]] = stats.splits.get(meta["split"], 0) + 1


def _meta(path: Path) -> dict | None:
    import json
    try:
        return json.loads(path.read_text()).get("meta")
    except (OSError, ValueError, AttributeError):
        return None


def plot_histograms(stats: DatasetStats, out_dir: Path) -> list[Path]:
    """One PNG per event kind: duration histograms, one colour per speaker."""
    try:
        import matplotlib
    except ImportError as exc:
        raise OpenMoshiError("histograms need matplotlib: pip install matplotlib (or openmoshi[data])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in EVENTS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        upper = 6.0 if kind == "ipu" else 2.0
        bins = np.linspace(0, upper, 41)
        for speaker in sorted(stats.events.durations.get(kind, {})):
            vals = np.clip(stats.events.values(kind, speaker), 0, upper)
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{speaker} (n={len(vals)})")
        ax.set_xlabel(f"{kind} duration (s)")
        ax.set_ylabel("count")
        ax.set_title(kind)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
