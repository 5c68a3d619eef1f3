"""Augmentation of the user channel of stereo dialogues [2, T] (channel 0 = Moshi, untouched; 1 = user).

What a real user's microphone adds, in the order it happens: the room (reverb from a synthetic impulse
response), Moshi's voice coming back from the loudspeaker (echo: Moshi's channel delayed and attenuated, through
the same room), background noise (coloured noise or noise files, at a signal-to-noise ratio), and the
microphone's level (gain -24..+15 dB), saturating at full scale. Every random choice comes from one seed, so an
item is augmented the same way every time it is drawn with the same seed.

    aug = UserAugmenter(AugmentConfig(), seed=0)
    out, applied = aug(stereo, index=item_index)      # stereo float [2, T] at 24 kHz; applied: what was done
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

SAMPLE_RATE = 24_000
NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f**exponent


@dataclass
class AugmentConfig:
    """Probabilities and ranges (uniform) of each effect on the user channel."""

    gain_prob: float = 1.0
    gain_db: tuple[float, float] = (-24.0, 15.0)
    noise_prob: float = 0.5
    noise_snr_db: tuple[float, float] = (5.0, 40.0)
    noise_colours: tuple[str, ...] = ("white", "pink", "brown")
    noise_files: tuple[str, ...] = ()  # used instead of coloured noise half of the time when given
    reverb_prob: float = 0.3
    rt60: tuple[float, float] = (0.15, 0.8)  # seconds for the tail to fall by 60 dB
    drr_db: tuple[float, float] = (0.0, 12.0)  # direct-to-reverberant energy ratio
    echo_prob: float = 0.3
    echo_delay: tuple[float, float] = (0.03, 0.3)  # seconds
    echo_db: tuple[float, float] = (-35.0, -10.0)  # echo level relative to Moshi's channel
    saturate: bool = True  # clip to [-1, 1] as a microphone's converter does

    def __post_init__(self) -> None:
        for name in ("gain_prob", "noise_prob", "reverb_prob", "echo_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augmentation {name} must be a probability in [0, 1]")
        for name in ("gain_db", "noise_snr_db", "rt60", "drr_db", "echo_delay", "echo_db"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"augmentation {name}: range {low}..{high} is empty")
        unknown = set(self.noise_colours) - set(NOISE_COLOURS)
        if unknown:
            raise ConfigError(f"unknown noise colours {sorted(unknown)}; use {sorted(NOISE_COLOURS)}")
        if self.rt60[0] <= 0 or self.echo_delay[0] < 0:
            raise ConfigError("rt60 must be positive and echo delays non-negative")


@dataclass
class Applied:
    """What one call did (None: effect not applied)."""

    gain_db: float | None = None
    noise: str | None = None
    snr_db: float | None = None
    rt60: float | None = None
    echo_delay: float | None = None
    echo_db: float | None = None
    extra: dict = field(default_factory=dict)


def _rms(x: torch.Tensor) -> float:
    active = x[x.abs() > 1e-4]
    return float(active.pow(2).mean().sqrt()) if active.numel() else 0.0


def coloured_noise(length: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-RMS noise [length] whose power spectrum falls as 1 / f**exponent."""
    spec = torch.fft.rfft(torch.randn(length, generator=gen, dtype=torch.float64))
    f = torch.arange(spec.numel(), dtype=torch.float64)
    f[0] = 1.0
    spec = spec / f.pow(exponent / 2)
    spec[0] = 0
    noise = torch.fft.irfft(spec, n=length)
    return (noise / noise.pow(2).mean().sqrt().clamp_min(1e-12)).float()


def room_impulse_response(rt60: float, drr_db: float, gen: torch.Generator,
                          sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Synthetic RIR [L]: a unit direct path, then exponentially decaying noise (60 dB down after rt60 seconds,
    starting 2-5 ms later), scaled so direct / reverberant energy = drr_db."""
    length = int(rt60 * sample_rate)
    predelay = int((0.002 + 0.003 * float(torch.rand((), generator=gen))) * sample_rate)
    t = torch.arange(length, dtype=torch.float64)
    tail = torch.randn(length, generator=gen, dtype=torch.float64) * torch.exp(-math.log(1000.0) * t / length)
    tail *= math.sqrt(10 ** (-drr_db / 10) / float(tail.pow(2).sum()))
    rir = torch.zeros(predelay + length, dtype=torch.float64)
    rir[0] = 1.0
    rir[predelay:] += tail
    return rir.float()


def _convolve(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    n = x.numel() + h.numel() - 1
    size = 1 << (n - 1).bit_length()
    y = torch.fft.irfft(torch.fft.rfft(x.double(), size) * torch.fft.rfft(h.double(), size), size)
    return y[:x.numel()].to(x.dtype)


def _load_noise(path: str) -> torch.Tensor:
    from ..audio.io import load_audio
    return load_audio(path, sample_rate=SAMPLE_RATE).wav[0]


class UserAugmenter:
    """Callable augmenter: `(stereo [2, T], index) -> (stereo [2, T], Applied)`, deterministic in (seed, index)."""

    def __init__(self, cfg: AugmentConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or AugmentConfig()
        self.seed = int(seed)
        self._noise_cache: dict[str, torch.Tensor] = {}

    def _noise_file(self, path: str) -> torch.Tensor:
        if path not in self._noise_cache:
            if not Path(path).is_file():
                raise ConfigError(f"noise file {path} not found")
            self._noise_cache[path] = _load_noise(path)
        return self._noise_cache[path]

    def __call__(self, stereo: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, Applied]:
        if stereo.dim() != 2 or stereo.shape[0] != 2:
            raise ConfigError(f"augmentation expects a stereo tensor [2, T], got shape {tuple(stereo.shape)}")
        cfg = self.cfg
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(index)) % (2 ** 63))

        def uniform(r: tuple[float, float]) -> float:
            return r[0] + (r[1] - r[0]) * float(torch.rand((), generator=gen))

        def happens(p: float) -> bool:
            return float(torch.rand((), generator=gen)) < p

        device, dtype = stereo.device, stereo.dtype
        moshi, user = stereo[0].detach().float().cpu(), stereo[1].detach().float().cpu()
        length = user.numel()
        applied = Applied()
        # the decisions are drawn in a fixed order, whatever is applied, so each effect's draw is stable
        do_reverb, do_echo, do_noise, do_gain = (happens(cfg.reverb_prob), happens(cfg.echo_prob),
                                                 happens(cfg.noise_prob), happens(cfg.gain_prob))
        level = _rms(user) or 0.1  # the user's speech level before the room changes it
        rir = None
        if do_reverb:
            applied.rt60 = uniform(cfg.rt60)
            rir = room_impulse_response(applied.rt60, uniform(cfg.drr_db), gen)
            wet = _convolve(user, rir)
            user = wet * (level / max(_rms(wet), 1e-9)) if _rms(user) > 0 else wet
        if do_echo:
            applied.echo_delay = uniform(cfg.echo_delay)
            applied.echo_db = uniform(cfg.echo_db)
            shift = round(applied.echo_delay * SAMPLE_RATE)
            echo = torch.zeros_like(moshi)
            if shift < length:
                echo[shift:] = moshi[:length - shift]
            if rir is not None:
                echo = _convolve(echo, rir)
            user = user + echo * 10 ** (applied.echo_db / 20)
        if do_noise:
            applied.snr_db = uniform(cfg.noise_snr_db)
            if cfg.noise_files and (not cfg.noise_colours or happens(0.5)):
                path = cfg.noise_files[int(torch.randint(len(cfg.noise_files), (), generator=gen))]
                source = self._noise_file(path)
                start = int(torch.randint(max(1, source.numel()), (), generator=gen))
                reps = -(-(start + length) // max(source.numel(), 1))
                noise = source.repeat(reps)[start:start + length]
                noise = noise / max(float(noise.pow(2).mean().sqrt()), 1e-9)
                applied.noise = f"file:{Path(path).name}"
            else:
                colours = cfg.noise_colours or ("white",)
                colour = colours[int(torch.randint(len(colours), (), generator=gen))]
                noise = coloured_noise(length, NOISE_COLOURS[colour], gen)
                applied.noise = colour
            user = user + noise * (level * 10 ** (-applied.snr_db / 20))
        if do_gain:
            applied.gain_db = uniform(cfg.gain_db)
            user = user * 10 ** (applied.gain_db / 20)
        if cfg.saturate:
            user = user.clamp(-1.0, 1.0)
        out = stereo.clone()
        out[1] = user.to(device=device, dtype=dtype)
        return out, applied
