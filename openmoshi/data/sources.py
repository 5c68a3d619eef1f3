"""Readers of LM training data, one contract for every stage.

- Text corpora: .txt files (one document each) or .jsonl files ({"text": ...} per line), or a folder of them.
- Audio with word alignments, moshi-finetune's format accepted as it is: a JSONL manifest of
  {"path": "rel/a.wav", "duration": 24.52} (paths relative to the manifest), and beside each a.wav an a.json
  {"alignments": [[word, [start, end], speaker], ...]}. A stereo file is a dialogue: channel 0 is Moshi,
  channel 1 the user. A mono file is speech of one stream (audio pretraining).
A manifest may also be given as a folder: every *.jsonl below it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from ..audio.io import MIMI_SAMPLE_RATE, resample
from ..errors import OpenMoshiError
from .interleave import AlignedWord, parse_alignments


class DataError(OpenMoshiError):
    """Training data that cannot be read."""


@dataclass(frozen=True)
class AudioItem:
    """One audio file of a manifest, with its alignments' path."""

    path: Path
    duration: float  # seconds, as the manifest says

    @property
    def alignments_path(self) -> Path:
        return self.path.with_suffix(".json")

    def words(self) -> list[AlignedWord]:
        path = self.alignments_path
        if not path.is_file():
            raise DataError(f"{self.path}: no alignments file {path.name} beside it (write "
                            "{\"alignments\": [[word, [start, end], speaker], ...]}, e.g. with `openmoshi data align`)")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc})") from exc
        return parse_alignments(raw, str(path))


def _manifests(source: Path) -> list[Path]:
    if source.is_dir():
        found = sorted(source.rglob("*.jsonl"))
        if not found:
            raise DataError(f"{source}: no *.jsonl manifest in this folder")
        return found
    if not source.is_file():
        raise DataError(f"data not found: {source} (expected a .jsonl manifest or a folder of them)")
    return [source]


def read_manifest(source: str | Path) -> list[AudioItem]:
    """The audio files listed by a JSONL manifest (or every manifest below a folder), in file order."""
    items = []
    for manifest in _manifests(Path(source)):
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                rel, duration = entry["path"], float(entry["duration"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{manifest}:{n}: expected {{\"path\": ..., \"duration\": seconds}} ({exc})") from exc
            path = Path(rel)
            if not path.is_absolute():
                path = manifest.parent / path
            if duration <= 0:
                raise DataError(f"{manifest}:{n}: duration must be positive, got {duration}")
            items.append(AudioItem(path, duration))
    if not items:
        raise DataError(f"{source}: the manifest lists no audio file")
    return items


def read_channels(path: Path, start: float = 0.0, duration: float | None = None,
                  sample_rate: int = MIMI_SAMPLE_RATE) -> torch.Tensor:
    """Channels of an audio file from `start` for `duration` seconds (zero-padded past the end),
    resampled to `sample_rate` -> float [C, samples]."""
    try:
        info = soundfile.info(str(path))
        first = round(start * info.samplerate)
        count = -1 if duration is None else round(duration * info.samplerate)
        data, rate = soundfile.read(str(path), start=first, frames=count, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"cannot read audio {path}: {exc}") from exc
    wav = torch.from_numpy(np.ascontiguousarray(data.T))
    if rate != sample_rate:
        wav = resample(wav, rate, sample_rate)
    if duration is not None:
        wanted = round(duration * sample_rate)
        wav = torch.nn.functional.pad(wav[:, :wanted], (0, max(0, wanted - wav.shape[1])))
    return wav


def read_text_documents(source: str | Path) -> list[str]:
    """Documents of a text corpus: each .txt file is one, each line of a .jsonl file is one ({"text": ...})."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{source}: no .txt or .jsonl file in this folder")
    elif source.is_file():
        files = [source]
    else:
        raise DataError(f"text data not found: {source}")
    docs = []
    for path in files:
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{path}:{n}: expected {{\"text\": ...}} ({exc})") from exc
        else:
            docs.append(path.read_text())
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{source}: no text")
    return docs


def crop_starts(duration: float, crop: float) -> list[float]:
    """Starts of the consecutive crops of `crop` seconds covering `duration` (the last one zero-padded)."""
    return [j * crop for j in range(max(1, math.ceil(duration / crop - 1e-6)))]
