"""Stereo dialogues in moshi-finetune's format, spoken by espeak-ng one word at a time so word times are known."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from openmoshi.audio.io import resample

SAMPLE_RATE = 24_000


def spoken_word(word: str, voice: str, tmp: Path) -> np.ndarray:
    """One word by espeak-ng at 24 kHz, leading and trailing silence trimmed."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it)")
    raw = tmp / "word.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "220", "-w", str(raw), word], check=True, capture_output=True)
    data, sr = sf.read(raw, dtype="float32")
    data = resample(torch.from_numpy(data)[None], sr, SAMPLE_RATE)[0].numpy()
    loud = np.flatnonzero(np.abs(data) > 0.02)
    return data[loud[0]:loud[-1] + 1]


def make_dialogue(folder: Path, name: str, moshi: list[tuple[str, float]], user: list[tuple[str, float]],
                  duration: float) -> tuple[Path, list]:
    """Write folder/name.wav (channel 0 = Moshi's words, channel 1 = the user's, each word starting at its
    given second), folder/name.json with its alignments, and folder/name.jsonl (a one-line manifest).
    Returns (manifest, alignments)."""
    folder.mkdir(parents=True, exist_ok=True)
    audio = np.zeros((2, int(duration * SAMPLE_RATE)), dtype=np.float32)
    alignments = []
    for channel, (words, voice, speaker) in enumerate([(moshi, "en-us", "SPEAKER_MAIN"),
                                                       (user, "en-gb+f3", "SPEAKER_1")]):
        for word, start in words:
            wav = spoken_word(word, voice, folder)
            first = int(start * SAMPLE_RATE)
            wav = wav[: audio.shape[1] - first]
            audio[channel, first:first + len(wav)] = wav
            alignments.append([word, [start, round(start + len(wav) / SAMPLE_RATE, 3)], speaker])
    alignments.sort(key=lambda a: a[1][0])
    sf.write(folder / f"{name}.wav", audio.T, SAMPLE_RATE)
    (folder / f"{name}.json").write_text(json.dumps({"alignments": alignments}))
    manifest = folder / f"{name}.jsonl"
    manifest.write_text(json.dumps({"path": f"{name}.wav", "duration": duration}) + "\n")
    return manifest, alignments
