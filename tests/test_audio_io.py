"""Tests for openmoshi.audio.io: decoding many formats, mixdown, resampling, errors, saving, framing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sphn
import torch

from openmoshi.audio import io as audio_io
from openmoshi.audio.io import LoadedAudio, load_audio, pad_to_multiple, resample, save_wav, split_frames
from openmoshi.errors import AudioError, ConfigError, OpenMoshiError

SPEECH = Path("/work/shared/data/speech/utt1.wav")


def _two_tone(sr: int, seconds: float = 1.0) -> np.ndarray:
    """Stereo [T, 2] float32: 440 Hz left, 660 Hz right, amplitude 0.4."""
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1)).astype(np.float32)


def _expected_mono(n: int, sr: int = 24000) -> np.ndarray:
    """The mean of the two tones, sampled at `sr`."""
    t = np.arange(n) / sr
    return 0.2 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 660 * t)


def _tone(freq: float, sr: int, n: int) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / sr).float()


# (file name, soundfile format, subtype, rate, lossless)
FORMATS = [
    ("pcm16.wav", "WAV", "PCM_16", 44100, True),
    ("float.wav", "WAV", "FLOAT", 44100, True),
    ("pcm24.flac", "FLAC", "PCM_24", 44100, True),
    ("vorbis.ogg", "OGG", "VORBIS", 44100, False),
    ("opus.ogg", "OGG", "OPUS", 48000, False),
    ("layer3.mp3", "MP3", "MPEG_LAYER_III", 44100, False),
    ("pcm16.aiff", "AIFF", "PCM_16", 22050, True),
]


@pytest.mark.parametrize("name,fmt,subtype,rate,lossless", FORMATS)
def test_load_formats_stereo_resampled(tmp_path, name, fmt, subtype, rate, lossless):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    path = tmp_path / name
    sf.write(path, _two_tone(rate), rate, format=fmt, subtype=subtype)

    audio = load_audio(path)

    assert isinstance(audio, LoadedAudio)
    assert audio.wav.dtype == torch.float32 and audio.wav.shape == (1, 24000)
    assert audio.sample_rate == 24000 and audio.original_sample_rate == rate and audio.original_channels == 2
    assert audio.duration == pytest.approx(1.0)
    assert audio.notes == ["mixed 2 channels down to mono", f"resampled {rate} Hz -> 24000 Hz"]
    got = audio.wav[0].numpy()[500:-500]  # edges see the zero padding of the resampler
    want = _expected_mono(24000)[500:-500]
    if lossless:
        assert np.abs(got - want).max() < 1e-3
    else:
        assert np.corrcoef(got, want)[0, 1] > 0.999  # also proves there is no decoder delay left


def test_load_native_rate_mono_is_untouched(tmp_path):
    pcm = (np.random.default_rng(0).uniform(-0.5, 0.5, 4800)).astype(np.float32)
    path = tmp_path / "mono.wav"
    sf.write(path, pcm, 24000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.notes == []
    assert torch.equal(audio.wav, torch.from_numpy(pcm)[None])
    assert audio.original_channels == 1 and audio.duration == pytest.approx(0.2)


def test_load_real_speech():
    if not SPEECH.exists():
        pytest.skip("shared speech sample not present")
    audio = load_audio(SPEECH)
    ref, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 24000 and audio.notes == []
    assert np.array_equal(audio.wav[0].numpy(), ref)


def test_load_other_target_rate_and_many_channels(tmp_path):
    rng = np.random.default_rng(1)
    pcm = rng.uniform(-0.3, 0.3, (16000, 6)).astype(np.float32)
    path = tmp_path / "six.wav"
    sf.write(path, pcm, 16000, subtype="FLOAT")
    audio = load_audio(path, sample_rate=16000)
    assert audio.notes == ["mixed 6 channels down to mono"]
    np.testing.assert_allclose(audio.wav[0].numpy(), pcm.mean(axis=1), atol=1e-6)


def test_non_finite_samples_are_zeroed_and_reported(tmp_path):
    pcm = np.full(2400, 0.25, dtype=np.float32)
    pcm[[3, 10, 100]] = [np.nan, np.inf, -np.inf]
    path = tmp_path / "nan.wav"
    sf.write(path, pcm, 24000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.notes == ["replaced 3 non-finite samples with 0"]
    assert torch.isfinite(audio.wav).all()
    assert audio.wav[0, 3] == 0 and audio.wav[0, 4] == pytest.approx(0.25)


def test_fallback_to_sphn_when_soundfile_fails(tmp_path, monkeypatch):
    wav_path = tmp_path / "s.wav"
    sf.write(wav_path, _two_tone(48000, 0.5), 48000, subtype="PCM_16")
    opus_path = tmp_path / "s.ogg"
    sphn.write_opus(str(opus_path), _two_tone(24000, 0.5)[:, 0].copy(), 24000)

    def broken(*args, **kwargs):
        raise RuntimeError("libsndfile unavailable")

    monkeypatch.setattr(audio_io.soundfile, "read", broken)
    audio = load_audio(wav_path)  # read by sphn.read (symphonia)
    np.testing.assert_allclose(audio.wav[0, 500:-500].numpy(), _expected_mono(12000)[500:-500], atol=1e-3)
    opus = load_audio(opus_path)  # sphn.read cannot read Ogg-Opus: read by sphn.read_opus at 48 kHz
    assert opus.original_sample_rate == 48000 and opus.original_channels == 1
    assert abs(opus.wav.shape[-1] - 12000) <= 960


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found.*nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="not a file"):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty.wav is empty \(0 bytes\)"):
        load_audio(path)


def test_zero_sample_wav(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 24000)
    assert path.stat().st_size > 0  # a valid header with no frames
    with pytest.raises(AudioError, match="zero.wav contains no audio samples"):
        load_audio(path)


def test_text_file_with_audio_extension_is_corrupt(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="could not decode audio file .*notes.wav.*corrupt or truncated"):
        load_audio(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "blob.xyz"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(AudioError, match=r"blob.xyz: unknown or unsupported audio format '.xyz'"):
        load_audio(path)


def test_truncated_header(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _two_tone(24000, 0.1), 24000)
    bad = tmp_path / "cut.wav"
    bad.write_bytes(good.read_bytes()[:30])
    with pytest.raises(AudioError, match="cut.wav"):
        load_audio(bad)


def test_implausible_sample_rate_is_rejected(tmp_path):
    # A corrupt header claiming 1 Hz would otherwise be "resampled" into billions of samples.
    path = tmp_path / "one_hz.wav"
    sf.write(path, np.zeros((4000, 1), np.float32), 1)
    with pytest.raises(AudioError, match="implausible sample rate 1 Hz"):
        load_audio(path)


def test_bad_target_rate():
    with pytest.raises(ConfigError):
        load_audio(SPEECH, sample_rate=0)


def test_corrupted_files_only_raise_audio_error(tmp_path):
    rng = np.random.default_rng(123)
    sources = []
    for name, fmt, subtype, rate, _ in FORMATS[:5]:
        path = tmp_path / f"src_{name}"
        sf.write(path, _two_tone(rate, 0.3), rate, format=fmt, subtype=subtype)
        sources.append(path)
    ok = failed = 0
    for i in range(60):
        src = sources[i % len(sources)]
        data = bytearray(src.read_bytes())
        mode = i % 3
        if mode == 0:
            data = data[: rng.integers(1, len(data))]
        elif mode == 1:
            for _ in range(30):
                data[rng.integers(len(data))] = rng.integers(256)
        else:
            for _ in range(4):
                data[rng.integers(min(64, len(data)))] = rng.integers(256)
        path = tmp_path / f"fuzz{i}{src.suffix}"
        path.write_bytes(bytes(data))
        try:
            audio = load_audio(path)
        except AudioError as exc:
            assert path.name in str(exc)
            failed += 1
        else:
            assert audio.wav.ndim == 2 and audio.wav.shape[0] == 1 and torch.isfinite(audio.wav).all()
            ok += 1
    assert ok + failed == 60 and failed > 0
    assert issubclass(AudioError, OpenMoshiError)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("src", [44100, 48000, 16000, 8000, 22050, 32000, 12345])
def test_resample_sine_accuracy(src):
    x = _tone(1000.0, src, src // 2)
    y = resample(x, src, 24000)
    assert y.shape == (math.ceil(len(x) * 24000 / src),)
    want = _tone(1000.0, 24000, y.shape[-1])
    assert (y - want)[300:-300].abs().max() < 1e-4


def test_resample_removes_aliases_and_keeps_passband():
    above = resample(_tone(15000.0, 44100, 44100), 44100, 24000)  # would alias to 9 kHz
    assert above[300:-300].pow(2).mean().sqrt() < 1e-3
    passband = resample(_tone(5000.0, 44100, 44100), 44100, 24000)
    assert passband[300:-300].pow(2).mean().sqrt() == pytest.approx(math.sqrt(0.5), rel=1e-3)


def test_resample_polyphase_equals_direct_form_and_keeps_leading_shape():
    x = torch.randn(2, 3, 4410, generator=torch.Generator().manual_seed(0))
    y = resample(x, 44100, 24000)
    assert y.shape == (2, 3, 2400)
    direct = audio_io._resample_direct(x.reshape(6, -1), 80, 147, 2400).reshape(2, 3, -1)
    torch.testing.assert_close(y, direct, atol=1e-5, rtol=0)
    assert resample(x, 24000, 24000) is x
    assert resample(torch.zeros(1, 0), 44100, 24000).shape == (1, 0)


# ----------------------------------------------------------------------------- saving and framing


def test_save_wav_int16_stereo_round_trip(tmp_path):
    wav = torch.from_numpy(_two_tone(24000, 0.2).T.copy())  # [2, T]
    path = save_wav(tmp_path / "sub" / "out.wav", wav, 24000)
    info = sf.info(path)
    assert (info.channels, info.samplerate, info.subtype, info.frames) == (2, 24000, "PCM_16", 4800)
    back, _ = sf.read(path, dtype="float32")
    assert np.abs(back.T - wav.numpy()).max() <= 1 / 32768 + 1e-7


def test_save_wav_float_mono_exact_and_1d(tmp_path):
    wav = torch.linspace(-1.5, 1.5, 1000)  # float keeps out-of-range values
    path = save_wav(tmp_path / "f.wav", wav, 16000, dtype="float32")
    back, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and sf.info(path).subtype == "FLOAT"
    assert np.array_equal(back, wav.numpy())


def test_save_wav_int16_clips(tmp_path):
    path = save_wav(tmp_path / "c.wav", np.array([[-2.0, 0.5, 3.0]], np.float32), 24000)
    back, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(back, [-1.0, 0.5, 32767 / 32768], atol=1e-4)


def test_save_wav_rejects_bad_shapes(tmp_path):
    with pytest.raises(AudioError, match=r"did you pass \[T, C\]"):
        save_wav(tmp_path / "x.wav", torch.zeros(4800, 2), 24000)
    with pytest.raises(AudioError, match="expects"):
        save_wav(tmp_path / "x.wav", torch.zeros(2, 2, 10), 24000)
    with pytest.raises(ConfigError):
        save_wav(tmp_path / "x.wav", torch.zeros(10), 24000, dtype="int8")  # type: ignore[arg-type]


def test_pad_to_multiple_and_split_frames():
    wav = torch.arange(1, 4001, dtype=torch.float32)[None]
    padded = pad_to_multiple(wav)
    assert padded.shape == (1, 5760)
    assert torch.equal(padded[:, :4000], wav) and padded[:, 4000:].abs().sum() == 0
    assert pad_to_multiple(padded) is padded
    frames = split_frames(wav)
    assert frames.shape == (1, 3, 1920)
    assert frames[0, 1, 0] == 1921 and frames[0, 2, 4000 - 3840 - 1] == 4000 and frames[0, 2, -1] == 0
    assert split_frames(torch.zeros(2, 960), 480).shape == (2, 2, 480)
