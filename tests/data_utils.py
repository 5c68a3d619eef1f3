"""A reader of moshi-finetune data written from its documented contract (../shared/spec/training.md), kept
independent of openmoshi.data so tests check our writer against the contract, not against itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def read_contract_manifest(manifest: Path) -> list[dict]:
    """Each JSONL line is {"path": wav relative to the manifest, "duration": seconds}; NAME.json sits beside
    NAME.wav with {"alignments": [[word, [start, end], speaker], ...]}; channel 0 = Moshi, channel 1 = user."""
    items = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        assert set(entry) == {"path", "duration"}, entry
        wav = manifest.parent / entry["path"]
        audio, sr = sf.read(wav, dtype="float32", always_2d=True)
        alignments = json.loads(wav.with_suffix(".json").read_text())["alignments"]
        words = []
        for item in alignments:
            text, (start, end), speaker = item
            assert isinstance(text, str) and isinstance(speaker, str)
            words.append((text, float(start), float(end), speaker))
        items.append({"name": entry["path"], "duration": float(entry["duration"]), "wav": wav,
                      "audio": audio, "sr": sr, "words": words})
    return items


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
