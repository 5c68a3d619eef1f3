"""moshi-finetune's data format: manifests, alignment files, and atomic writes.

- manifest: JSONL lines `{"path": "rel/or/abs.wav", "duration": seconds}`, paths relative to the manifest's folder;
- alignments: `NAME.json` beside `NAME.wav`, `{"alignments": [[word, [start, end], speaker], ...]}`; Moshi's words
  carry `SPEAKER_MAIN` (the only speaker moshi-finetune trains on), the user's `SPEAKER_USER`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpenMoshiError

SAMPLE_RATE = 24_000
SPEAKER_MAIN = "SPEAKER_MAIN"
SPEAKER_USER = "SPEAKER_USER"
MOSHI_CHANNEL, USER_CHANNEL = 0, 1


class DataFormatError(OpenMoshiError):
    """A manifest or alignment file does not follow moshi-finetune's format."""


@dataclass(frozen=True)
class Word:
    """One aligned word: text as spoken (punctuation attached), times in seconds."""

    text: str
    start: float
    end: float
    speaker: str

    def to_json(self) -> list:
        return [self.text, [round(self.start, 5), round(self.end, 5)], self.speaker]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False) + "\n").encode())


def write_alignments(path: Path, words: Iterable[Word], extra: dict | None = None) -> None:
    """Write `NAME.json`: words sorted by start time, plus optional extra keys (moshi-finetune ignores them)."""
    ordered = sorted(words, key=lambda w: (w.start, w.end))
    obj = {"alignments": [w.to_json() for w in ordered]}
    if extra:
        obj.update(extra)
    atomic_write_json(path, obj)


def read_alignments(path: Path) -> list[Word]:
    """Read the words of an alignment file; a clear error when it is not in moshi-finetune's format."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
        return [Word(str(text), float(start), float(end), str(speaker))
                for text, (start, end), speaker in obj["alignments"]]
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: alignment file not found (expected beside its wav)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{path}: not a moshi-finetune alignment file ({exc}); expected "
                              '{"alignments": [[word, [start, end], speaker], ...]}') from exc


def write_manifest(path: Path, entries: Iterable[tuple[str, float]]) -> None:
    """Write a JSONL manifest of (path relative to the manifest's folder, duration in seconds)."""
    lines = [json.dumps({"path": p, "duration": round(d, 4)}) for p, d in entries]
    atomic_write_bytes(Path(path), ("\n".join(lines) + ("\n" if lines else "")).encode())


def read_manifest(path: Path) -> list[tuple[Path, float]]:
    """Read a JSONL manifest: absolute wav paths and durations."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            wav = Path(item["path"])
            out.append((wav if wav.is_absolute() else path.parent / wav, float(item["duration"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{path}:{n}: not a manifest line {{\"path\", \"duration\"}} ({exc})") from exc
    return out
