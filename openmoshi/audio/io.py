"""Audio files in and out: any common format and rate in, mono float32 at the model's rate out.

Decoding tries libsndfile (via soundfile: wav, flac, ogg vorbis/opus, mp3, aiff, ...) first, then sphn's
symphonia decoders (adds ADTS aac, matroska), then sphn's Ogg-Opus reader. Resampling is our own windowed-sinc
filter in torch, so loading never depends on torchaudio.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import sphn
import torch
import torch.nn.functional as F

from openmoshi.errors import AudioError, ConfigError

logger = logging.getLogger(__name__)

MIMI_SAMPLE_RATE = 24000
MIMI_FRAME_SIZE = 1920  # 80 ms at 24 kHz

_MIN_RATE, _MAX_RATE = 1000, 768_000  # plausible sample rates of real audio files

# Extensions we expect to decode; anything else that fails is reported as an unknown format.
AUDIO_EXTENSIONS = (
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".aiff",
    ".aif",
    ".aac",
    ".mka",
    ".au",
    ".caf",
)


@dataclass
class LoadedAudio:
    """An audio file decoded to mono float32 at `sample_rate`, with a record of what was converted."""

    wav: torch.Tensor  # [1, T] float32
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    duration: float  # seconds, of `wav`
    notes: list[str] = field(default_factory=list)


def _is_fatal(exc: BaseException) -> bool:
    # Rust panics in sphn surface as pyo3's PanicException, a BaseException: catch those, not Ctrl-C.
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
    data, sr = soundfile.read(path, dtype="float32", always_2d=True)  # [T, C]
    return np.ascontiguousarray(data.T), int(sr)


def _decode_sphn(path: str) -> tuple[np.ndarray, int]:
    data, sr = sphn.read(path)  # [C, T]
    return np.asarray(data, dtype=np.float32), int(sr)


def _decode_sphn_opus(path: str) -> tuple[np.ndarray, int]:
    data, sr = sphn.read_opus(path)  # [C, T], always 48 kHz
    return np.asarray(data, dtype=np.float32), int(sr)


_DECODERS = (("soundfile", _decode_soundfile), ("sphn", _decode_sphn), ("sphn-opus", _decode_sphn_opus))


def _decode_any(path: Path) -> tuple[np.ndarray, int]:
    """Returns ([C, T] float32, sample rate) from the first decoder that yields samples."""
    failures: list[str] = []
    got_empty = False
    for name, decode in _DECODERS:
        try:
            data, sr = decode(str(path))
        except BaseException as exc:  # libraries raise many types; all become one AudioError
            if _is_fatal(exc):
                raise
            failures.append(f"{name}: {exc}")
            continue
        if data.ndim != 2 or data.shape[0] == 0:
            failures.append(f"{name}: unusable result shape {data.shape}")
            continue
        if not _MIN_RATE <= sr <= _MAX_RATE:
            # A corrupt header can claim e.g. 1 Hz; resampling that would allocate without bound.
            failures.append(f"{name}: implausible sample rate {sr} Hz")
            continue
        if data.shape[1] == 0:
            got_empty = True
            continue
        logger.debug("decoded %s with %s: %s channels, %d samples at %d Hz", path, name, *data.shape, sr)
        return data, sr
    if got_empty:
        raise AudioError(f"audio file {path} contains no audio samples (0 frames).")
    ext = path.suffix.lower()
    detail = "; ".join(failures)
    if ext in AUDIO_EXTENSIONS:
        raise AudioError(
            f"could not decode audio file {path}: it looks corrupt or truncated ({detail}). "
            "Check that the file plays, or re-encode it, e.g. `ffmpeg -i in.ext out.wav`."
        )
    raise AudioError(
        f"could not read {path}: unknown or unsupported audio format {ext or '(no extension)'!r} ({detail}). "
        f"Supported: {', '.join(AUDIO_EXTENSIONS)}. Convert it with e.g. `ffmpeg -i in.ext out.wav`."
    )


def check_audio_path(path: str | os.PathLike) -> Path:
    """The path of an existing, non-empty audio file; `AudioError` saying what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"{path} is not a file (a directory?); pass the path of an audio file.")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes).")
    return path


def load_audio(path: str | os.PathLike, sample_rate: int = MIMI_SAMPLE_RATE) -> LoadedAudio:
    """Reads an audio file of any common format, mixes it to mono and resamples it to `sample_rate`.

    Returns a `LoadedAudio` whose `wav` is [1, T] float32. Raises `AudioError` (naming the file) when it is
    missing, empty, unreadable or in an unknown format.
    """
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ConfigError(f"sample_rate must be a positive integer, got {sample_rate!r}.")
    path = check_audio_path(path)

    data, original_sr = _decode_any(path)
    channels = data.shape[0]
    notes: list[str] = []

    bad = ~np.isfinite(data)
    if bad.any():
        notes.append(f"replaced {int(bad.sum())} non-finite samples with 0")
        data = np.where(bad, np.float32(0.0), data)
    if channels > 1:
        data = data.mean(axis=0, keepdims=True)  # mean, not sum: keeps the level of correlated channels
        notes.append(f"mixed {channels} channels down to mono")

    wav = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if original_sr != sample_rate:
        wav = resample(wav, original_sr, sample_rate)
        notes.append(f"resampled {original_sr} Hz -> {sample_rate} Hz")
    for note in notes:
        logger.info("%s: %s", path, note)
    return LoadedAudio(
        wav=wav,
        sample_rate=sample_rate,
        original_sample_rate=original_sr,
        original_channels=channels,
        duration=wav.shape[-1] / sample_rate,
        notes=notes,
    )


def save_wav(
    path: str | os.PathLike,
    wav: torch.Tensor | np.ndarray,
    sample_rate: int,
    dtype: Literal["int16", "float32"] = "int16",
) -> Path:
    """Writes `wav` ([T], [C, T] or [1, C, T], values in [-1, 1]) as a 16-bit PCM or 32-bit float wav file.

    Int16 output is clipped to [-1, 1] (with a warning when clipping happens). Creates parent folders.
    """
    if isinstance(wav, torch.Tensor):
        arr = wav.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(wav, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise AudioError(f"save_wav expects [T] or [C, T] audio, got shape {tuple(arr.shape)}.")
    if arr.shape[0] > 64:
        raise AudioError(
            f"save_wav got {arr.shape[0]} channels (shape {tuple(arr.shape)}); audio must be [C, T], "
            "did you pass [T, C]?"
        )
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ConfigError(f"sample_rate must be a positive integer, got {sample_rate!r}.")
    if dtype == "int16":
        subtype = "PCM_16"
        n_clipped = int((np.abs(arr) > 1.0).sum())
        if n_clipped:
            logger.warning("save_wav %s: clipping %d samples outside [-1, 1]", path, n_clipped)
            arr = np.clip(arr, -1.0, 1.0)
    elif dtype == "float32":
        subtype = "FLOAT"
    else:
        raise ConfigError(f"save_wav dtype must be 'int16' or 'float32', got {dtype!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.ascontiguousarray(arr.T), sample_rate, subtype=subtype, format="WAV")
    return path


def pad_to_multiple(wav: torch.Tensor, multiple: int = MIMI_FRAME_SIZE) -> torch.Tensor:
    """Right-pads the last axis of `wav` ([..., T]) with zeros to a multiple of `multiple` samples."""
    extra = -wav.shape[-1] % multiple
    return F.pad(wav, (0, extra)) if extra else wav


def split_frames(wav: torch.Tensor, frame_size: int = MIMI_FRAME_SIZE) -> torch.Tensor:
    """Pads `wav` [..., T] to whole frames and views it as [..., N, frame_size]."""
    padded = pad_to_multiple(wav, frame_size)
    return padded.reshape(*padded.shape[:-1], padded.shape[-1] // frame_size, frame_size)


# ---------------------------------------------------------------------------------------------------------
# Resampling: band-limited interpolation with a Kaiser-windowed sinc.
#
# Output sample j sits at input time t_j = j * orig / new. It is sum_n x[n] h(t_j - n), where h is a low-pass
# sinc cut slightly below the lower of the two Nyquist frequencies. For rational ratios up/down the fractional
# offsets repeat every `up` outputs, so the filter is `up` fixed kernels applied by one strided conv.
# Ratios with a large `up` (e.g. 12345 -> 24000) use the direct form in chunks instead.

_ZERO_CROSSINGS = 16  # sinc lobes on each side: stopband about -90 dB with the Kaiser window below
_ROLLOFF = 0.945  # cutoff as a fraction of the lower Nyquist frequency, leaves room for the transition band
_KAISER_BETA = 8.6
_MAX_POLYPHASE_UP = 1024


def _filter(t: torch.Tensor, cutoff: float, half_width: float) -> torch.Tensor:
    """Impulse response at offsets `t` (input samples, float64): cutoff * sinc(cutoff * t) * kaiser(t / W)."""
    u = (t / half_width).clamp(-1.0, 1.0)
    window = torch.special.i0(_KAISER_BETA * torch.sqrt(1.0 - u * u)) / torch.special.i0(
        torch.tensor(_KAISER_BETA, dtype=torch.float64)
    )
    window = torch.where(t.abs() < half_width, window, torch.zeros_like(window))
    return cutoff * torch.sinc(cutoff * t) * window


@functools.lru_cache(maxsize=16)
def _polyphase_kernels(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Returns ([up, 1, K] float32 kernels, left padding) for the rational ratio up/down."""
    cutoff = _ROLLOFF * min(1.0, up / down)
    half_width = _ZERO_CROSSINGS / cutoff
    pad = math.ceil(half_width)
    size = down + 2 * pad + 1
    phase_offset = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # t_j - k * down, in [0, down)
    taps = torch.arange(size, dtype=torch.float64)[None, :] - pad
    kernels = _filter(phase_offset - taps, cutoff, half_width)
    return kernels.to(torch.float32)[:, None, :], pad


def _resample_polyphase(x: torch.Tensor, up: int, down: int, out_len: int) -> torch.Tensor:
    kernels, pad = _polyphase_kernels(up, down)
    n_blocks = -(-out_len // up)
    size = kernels.shape[-1]
    right = max(0, (n_blocks - 1) * down + size - x.shape[-1] - pad)
    padded = F.pad(x[:, None, :], (pad, right))
    y = F.conv1d(padded, kernels.to(x.device, x.dtype), stride=down)  # [N, up, blocks]
    return y.transpose(1, 2).reshape(x.shape[0], -1)[:, :out_len]


def _resample_direct(x: torch.Tensor, up: int, down: int, out_len: int, chunk: int = 2048) -> torch.Tensor:
    cutoff = _ROLLOFF * min(1.0, up / down)
    half_width = _ZERO_CROSSINGS / cutoff
    pad = math.ceil(half_width)
    padded = F.pad(x, (pad, pad + 1))
    taps = torch.arange(-pad + 1, pad + 1, dtype=torch.int64)
    # The fractional offsets repeat every `up` outputs: tabulate the weights once when that table is small.
    table = None
    if up * taps.numel() <= 1 << 22:
        table = _filter(torch.arange(up, dtype=torch.float64)[:, None] / up - taps, cutoff, half_width)
        table = table.to(x.device, x.dtype)
    pieces = []
    for start in range(0, out_len, chunk):
        j = torch.arange(start, min(start + chunk, out_len), dtype=torch.int64)
        base = (j * down) // up  # integer part of t_j
        rem = j * down - base * up  # fractional part of t_j, times up
        if table is not None:
            weights = table[rem.to(x.device)]
        else:
            frac = rem.to(torch.float64) / up
            weights = _filter(frac[:, None] - taps.to(torch.float64), cutoff, half_width).to(
                x.device, x.dtype
            )
        index = base[:, None] + taps[None, :] + pad
        gathered = padded[:, index.to(x.device)]  # [N, chunk, taps]
        pieces.append((gathered * weights).sum(-1))
    return torch.cat(pieces, dim=-1)


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of `wav` [..., T] from `orig_sr` to `new_sr` Hz; returns [..., ceil(T*new/orig)].

    Zero delay (the filter is centred); frequencies above 0.945 x the lower Nyquist frequency are removed.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ConfigError(f"sample rates must be positive, got {orig_sr} -> {new_sr}.")
    if orig_sr == new_sr:
        return wav
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    lead, length = wav.shape[:-1], wav.shape[-1]
    out_len = -(-length * up // down)
    if length == 0:
        return wav.new_zeros(*lead, 0)
    x = wav.reshape(-1, length)
    if not x.is_floating_point():
        x = x.float()
    if up <= _MAX_POLYPHASE_UP:
        y = _resample_polyphase(x, up, down, out_len)
    else:
        y = _resample_direct(x, up, down, out_len)
    return y.reshape(*lead, out_len)
