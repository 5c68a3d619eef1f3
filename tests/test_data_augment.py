"""User-channel augmentation: deterministic from the seed, levels as configured, Moshi's channel untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from openmoshi.data.augment import AugmentConfig, UserAugmenter, coloured_noise, room_impulse_response
from openmoshi.errors import ConfigError

SR = 24_000
OFF = {"gain_prob": 0.0, "noise_prob": 0.0, "reverb_prob": 0.0, "echo_prob": 0.0}


def _stereo(seconds: float = 2.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    moshi = 0.1 * torch.sin(2 * math.pi * 220 * t) * (t < seconds / 2)
    user = 0.1 * torch.sin(2 * math.pi * 330 * t + 0.3) * (t >= seconds / 4)
    return torch.stack([moshi, user]).float()


def _db(x: float) -> float:
    return 20 * math.log10(x)


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def test_deterministic_per_seed_and_index_and_moshi_untouched():
    x = _stereo()
    aug = UserAugmenter(AugmentConfig(gain_prob=1, noise_prob=1, reverb_prob=1, echo_prob=1), seed=7)
    a, info_a = aug(x, index=3)
    b, info_b = UserAugmenter(AugmentConfig(gain_prob=1, noise_prob=1, reverb_prob=1, echo_prob=1), seed=7)(x, 3)
    c, _ = aug(x, index=4)
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a[1], c[1])
    assert torch.equal(a[0], x[0])
    assert a.shape == x.shape and a.dtype == x.dtype


def test_gain_range_and_value():
    x = _stereo(0.5)
    seen = []
    for i in range(30):
        out, info = UserAugmenter(AugmentConfig(**{**OFF, "gain_prob": 1.0}, saturate=False), seed=1)(x, i)
        assert -24 <= info.gain_db <= 15
        assert _db(_rms(out[1]) / _rms(x[1])) == pytest.approx(info.gain_db, abs=1e-3)
        seen.append(info.gain_db)
    assert min(seen) < -15 and max(seen) > 8  # the whole range is used
    loud, info = UserAugmenter(AugmentConfig(**{**OFF, "gain_prob": 1.0}, gain_db=(15, 15)), seed=0)(x * 8, 0)
    assert float(loud[1].abs().max()) <= 1.0  # saturates at full scale


def test_noise_at_the_requested_snr_and_colour():
    x = _stereo()
    speech = x[1][x[1].abs() > 1e-4]
    for i in range(6):
        out, info = UserAugmenter(AugmentConfig(**{**OFF, "noise_prob": 1.0}), seed=2)(x, i)
        noise = out[1] - x[1]
        assert _db(_rms(speech) / _rms(noise)) == pytest.approx(info.snr_db, abs=0.05)
        assert 5 <= info.snr_db <= 40 and info.noise in ("white", "pink", "brown")
    gen = torch.Generator().manual_seed(0)
    for exponent, slope in ((0.0, 0.0), (1.0, -3.0), (2.0, -6.0)):  # dB per octave of the power spectrum
        n = coloured_noise(1 << 16, exponent, gen)
        psd = torch.fft.rfft(n.double()).abs().pow(2)
        f = torch.arange(psd.numel())
        low, high = psd[(f >= 1000) & (f < 2000)].mean(), psd[(f >= 2000) & (f < 4000)].mean()
        assert 10 * math.log10(float(high / low)) == pytest.approx(slope, abs=0.6)
        assert _rms(n) == pytest.approx(1.0, rel=1e-4)


def test_noise_files(tmp_path):
    noise = np.random.default_rng(0).standard_normal(SR // 2).astype(np.float32) * 0.05
    path = tmp_path / "hum.wav"
    sf.write(path, noise, SR)
    cfg = AugmentConfig(**{**OFF, "noise_prob": 1.0}, noise_colours=(), noise_files=(str(path),))
    out, info = UserAugmenter(cfg, seed=0)(_stereo(), 0)
    assert info.noise == "file:hum.wav"
    added = (out[1] - _stereo()[1]).numpy()
    # the file's noise, looped and scaled: correlates perfectly with a shifted copy of the file
    corr = np.correlate(np.tile(noise, 6)[:len(added) + len(noise)], added[:len(noise)], mode="valid")
    best = int(np.argmax(np.abs(corr)))
    seg = np.tile(noise, 6)[best:best + len(noise)]
    assert abs(np.corrcoef(seg, added[:len(noise)])[0, 1]) > 0.999
    with pytest.raises(ConfigError, match="not found"):
        UserAugmenter(AugmentConfig(**{**OFF, "noise_prob": 1.0}, noise_colours=(), noise_files=("/nope.wav",)))(
            _stereo(), 0)


def test_reverb_decays_with_rt60():
    gen = torch.Generator().manual_seed(0)
    rir = room_impulse_response(0.5, 3.0, gen)
    assert rir[0] == 1.0
    tail = rir[1:].double().pow(2)
    assert 10 * math.log10(1.0 / float(tail.sum())) == pytest.approx(3.0, abs=1e-6)
    # energy 100 ms windows: -60 dB over rt60 means about -12 dB per 100 ms
    w = int(0.1 * SR)
    e = [float(tail[k * w:(k + 1) * w].sum()) for k in range(4)]
    drops = [10 * math.log10(e[k] / e[k + 1]) for k in range(3)]
    assert all(abs(d - 12.0) < 2.5 for d in drops), drops
    # on speech: a tail after the user stops, same level as the dry signal
    x = _stereo()
    x[1, SR:] = 0
    out, info = UserAugmenter(AugmentConfig(**{**OFF, "reverb_prob": 1.0}, rt60=(0.5, 0.5)), seed=0)(x, 0)
    assert info.rt60 == 0.5
    assert _rms(out[1, SR:SR + SR // 10]) > 1e-3 and _rms(out[1, SR + SR // 2:]) < _rms(out[1, SR:SR + SR // 10]) / 100


def test_echo_of_moshi_at_reported_delay_and_level():
    x = _stereo()
    x[0] = torch.from_numpy(np.random.default_rng(1).standard_normal(x.shape[1]).astype(np.float32) * 0.1)
    out, info = UserAugmenter(AugmentConfig(**{**OFF, "echo_prob": 1.0}), seed=4)(x, 0)
    added = (out[1] - x[1]).numpy()
    moshi = x[0].numpy()
    n = 1 << (2 * len(moshi)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(added, n) * np.conj(np.fft.rfft(moshi, n)), n)[:int(0.35 * SR)]
    assert abs(int(np.argmax(corr)) - info.echo_delay * SR) <= 1
    shift = round(info.echo_delay * SR)
    gain = np.dot(added[shift:], moshi[:-shift]) / np.dot(moshi[:-shift], moshi[:-shift])
    assert _db(gain) == pytest.approx(info.echo_db, abs=0.01)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"\[2, T\]"):
        UserAugmenter()(torch.zeros(1, 100))
    with pytest.raises(ConfigError, match="probability"):
        AugmentConfig(noise_prob=2.0)
