"""Reading long audio files block by block: mono float32 at a target rate, memory independent of the length.

Blocks are resampled with enough input context on both sides that the result matches resampling the whole
file (the filter is finite: 16 zero crossings), so streaming changes nothing but the memory used. Files
libsndfile cannot seek in (formats only sphn decodes) fall back to a whole-file read.
"""

from __future__ import annotations

import logging
import math
import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch

from ..errors import AudioError
from .io import _MAX_RATE, _MIN_RATE, MIMI_SAMPLE_RATE, check_audio_path, load_audio, resample

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 10.0


@dataclass
class AudioStream:
    """An audio file to be read in blocks (`blocks()`), with what is known up front."""

    path: Path
    sample_rate: int  # of the blocks
    original_sample_rate: int
    original_channels: int
    duration: float  # seconds
    notes: list[str] = field(default_factory=list)
    _whole: torch.Tensor | None = None  # set when the file had to be decoded at once

    def blocks(self, block_seconds: float = BLOCK_SECONDS) -> tp.Iterator[torch.Tensor]:
        """Float32 [1, n] blocks at `sample_rate`, about `block_seconds` each, the whole file in order."""
        if self._whole is not None:
            step = max(1, int(block_seconds * self.sample_rate))
            for start in range(0, self._whole.shape[-1], step):
                yield self._whole[:, start:start + step]
            return
        yield from _read_blocks(self, block_seconds)


def open_audio(path: str | os.PathLike, sample_rate: int = MIMI_SAMPLE_RATE) -> AudioStream:
    """Checks an audio file and returns a stream of it; `AudioError` (naming the file) if it is unusable."""
    path = check_audio_path(path)
    try:
        info = soundfile.info(str(path))
        usable = info.frames > 0 and _MIN_RATE <= info.samplerate <= _MAX_RATE and info.channels > 0
    except (RuntimeError, OSError):  # libsndfile cannot read it: the whole-file decoders may
        usable = False
    if not usable:
        loaded = load_audio(path, sample_rate)
        return AudioStream(path, sample_rate, loaded.original_sample_rate, loaded.original_channels,
                           loaded.duration, list(loaded.notes), loaded.wav)
    notes = []
    if info.channels > 1:
        notes.append(f"mixed {info.channels} channels down to mono")
    if info.samplerate != sample_rate:
        notes.append(f"resampled {info.samplerate} Hz -> {sample_rate} Hz")
    out_len = -(-info.frames * sample_rate // info.samplerate)
    return AudioStream(path, sample_rate, info.samplerate, info.channels, out_len / sample_rate, notes)


def _read_blocks(stream: AudioStream, block_seconds: float) -> tp.Iterator[torch.Tensor]:
    sr_in, sr_out = stream.original_sample_rate, stream.sample_rate
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    # Input blocks start on multiples of `down`, so each maps to a whole number of output samples; the
    # context covers the resampling filter's reach (16 zero crossings of the lower band edge, and margin).
    block = max(1, round(block_seconds * sr_in / down)) * down
    context = 0 if up == down else -(-int(40 * max(1, down / up)) // down) * down
    replaced = 0
    with soundfile.SoundFile(str(stream.path)) as f:
        total = f.frames
        total_out = -(-total * up // down)
        for start in range(0, total, block):
            end = min(total, start + block)
            lo, hi = max(0, start - context), min(total, end + context)
            f.seek(lo)
            data = f.read(hi - lo, dtype="float32", always_2d=True)  # [n, C]
            if data.shape[0] != hi - lo:
                raise AudioError(f"{stream.path}: the file ended early ({lo + data.shape[0]} of {total} frames); "
                                 "it looks truncated")
            mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            bad = ~np.isfinite(mono)
            if bad.any():
                replaced += int(bad.sum())
                mono = np.where(bad, np.float32(0.0), mono)
            x = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))[None]
            if up == down:
                yield x
                continue
            y = resample(x, sr_in, sr_out)
            first = (start - lo) * up // down
            n = (min(total_out, end * up // down) if end < total else total_out) - start * up // down
            yield y[:, first:first + n]
    if replaced:
        stream.notes.append(f"replaced {replaced} non-finite samples with 0")
        logger.info("%s: replaced %d non-finite samples with 0", stream.path, replaced)
